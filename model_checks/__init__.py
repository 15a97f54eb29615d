"""LLaMA-family checks: [P]'s identities on real checkpoints through TransformerLens's TransformerBridge."""
