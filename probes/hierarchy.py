"""The method hierarchy of [P] (docs/papers.md §1), checked exactly:
prompting ⊆ soft prompting ⊆ prefix-tuning ⊂ full fine-tuning.

- a hard prompt equals its soft prompt (the embeddings of the tokens);
- any soft prompt converts to a prefix with identical outputs: the prefix keys/values are what the
  frozen model computes at the prompt positions, layer by layer;
- `classify` says which class a method state's effect falls in, with its evidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from toy_models.model import MethodState, ToyTransformer

TOL = 1e-5


@torch.no_grad()
def soft_prompt_to_prefix(model: ToyTransformer, prompt: Tensor) -> MethodState:
    """The prefix equivalent of a soft prompt [P, d_model]: per layer, the keys/values at the
    prompt positions (they do not depend on the content, which comes after them)."""
    P = prompt.shape[-2]
    names = {f"blocks.{l}.attn.hook_{kv}" for l in range(model.cfg.n_layers) for kv in ("k", "v")}
    dummy = torch.zeros(1, 1, dtype=torch.long)
    _, cache = model.run_with_cache(dummy, state=MethodState(prompt=prompt), names_filter=lambda n: n in names)
    ks = [cache[f"blocks.{l}.attn.hook_k"][0, :P].transpose(0, 1) for l in range(model.cfg.n_layers)]
    vs = [cache[f"blocks.{l}.attn.hook_v"][0, :P].transpose(0, 1) for l in range(model.cfg.n_layers)]
    return MethodState(prefix_k=ks, prefix_v=vs)


@dataclass
class HierarchyCheck:
    hard_equals_soft: float  # max |logits| difference
    soft_equals_prefix: float  # max |content logits| difference

    def to_json(self) -> dict:
        return {"hard_equals_soft_max_diff": self.hard_equals_soft,
                "soft_equals_prefix_max_diff": self.soft_equals_prefix,
                "hard_equals_soft": self.hard_equals_soft == 0.0,
                "soft_equals_prefix": self.soft_equals_prefix <= TOL}


@torch.no_grad()
def check_hierarchy(model: ToyTransformer, tokens: Tensor, hard_prompt: list[int],
                    soft_prompt: Tensor | None = None) -> HierarchyCheck:
    model.eval()
    W_E = model.embed.W_E
    hard = model(tokens, MethodState(prompt=W_E[torch.tensor(hard_prompt)]))
    soft_from_tokens = MethodState(prompt=W_E[torch.tensor(hard_prompt)].clone())
    d1 = (model(tokens, soft_from_tokens) - hard).abs().max().item()
    prompt = soft_prompt if soft_prompt is not None else torch.randn(len(hard_prompt), model.cfg.d_model)
    with_prompt = model.content_logits(tokens, MethodState(prompt=prompt))
    with_prefix = model.content_logits(tokens, soft_prompt_to_prefix(model, prompt))
    d2 = (with_prompt - with_prefix).abs().max().item()
    return HierarchyCheck(d1, d2)


def classify(model: ToyTransformer, state: MethodState, layer0_invariant: bool | None = None) -> dict:
    """Which class of [P]'s hierarchy a method state's effect falls in."""
    if state.weights:
        if layer0_invariant:
            cls = "weights (layer-0 attention unchanged, e.g. LoRA on o/MLP)"
        else:
            cls = "full fine-tuning class (changes layer-0 attention: beyond prefix-tuning)"
        return {"class": cls, "evidence": f"{len(state.weights)} weight tensors changed; "
                f"layer-0 invariance {'holds' if layer0_invariant else 'broken'}"}
    if state.prompt is not None:
        rows = state.prompt.reshape(-1, state.prompt.shape[-1])
        d = torch.cdist(rows.detach(), model.embed.W_E.detach()).min(1).values
        if bool((d == 0).all()):
            return {"class": "prompting (hard prompt)", "evidence": "every prompt embedding is a row of W_E"}
        return {"class": "soft prompting", "evidence": f"prompt embeddings {float(d.min()):.3g}.. away from any token"}
    if state.prefix_k is not None:
        n = sum(k is not None for k in state.prefix_k)
        return {"class": "prefix-tuning", "evidence": f"prefix keys/values in {n} of {len(state.prefix_k)} layers"}
    return {"class": "none", "evidence": "empty method state"}
