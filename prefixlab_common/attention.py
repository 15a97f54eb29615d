"""Attention-identity maths shared by the toy probes (probes/invariance.py) and the LLaMA checks
(model_checks/identities.py): the Jensen-Shannon divergence between a renormalized pattern and the
base pattern (docs/papers.md §4: with a prefix, the content pattern divided by 1 − α should equal the
base pattern).

Two forms are kept because they differ in their last bits, and each side's recorded numbers were
computed with its own: the probes sum each row's pointwise differences and clamp the result at 0
(fp32 patterns whose rows sum to 1); the LLaMA checks clamp the inputs at 0 (half-precision patterns
cast up may carry tiny negatives) and sum the two terms of each KL apart. Unifying them would change
the reported divergences, so both stay, named for what they do."""

from __future__ import annotations

import torch
from torch import Tensor


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) between distributions on the last axis; 0·log 0 = 0; a
    negative result of rounding is clamped to 0 (the toy probes' form)."""
    m = 0.5 * (p + q)
    kl = lambda a, b: (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)
    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0)


def js_divergence_clamped_inputs(p: Tensor, q: Tensor) -> Tensor:
    """Jensen–Shannon divergence (nats) along the last axis; 0·log 0 = 0; the inputs are clamped at
    0 first (the LLaMA checks' form)."""
    p, q = p.clamp_min(0), q.clamp_min(0)
    m = (p + q) / 2

    def kl(a, b):
        return torch.xlogy(a, a).sum(-1) - torch.xlogy(a, b).sum(-1)

    return (kl(p, m) + kl(q, m)) / 2
