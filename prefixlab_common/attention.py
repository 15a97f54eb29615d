"""Attention-identity maths shared by the toy probes (probes/invariance.py, probes/drift.py) and
the LLaMA checks (model_checks/identities.py): the Jensen-Shannon divergence between a
renormalized pattern and the base pattern (docs/papers.md §4: with a prefix, the content pattern
divided by 1 − α should equal the base pattern)."""

from __future__ import annotations

import torch
from torch import Tensor


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) between distributions on the last axis; 0·log 0 = 0.
    The inputs are clamped at 0 first (a half-precision pattern cast up may carry tiny negatives),
    each KL sums its pointwise terms (no cancellation between two large sums), and a negative
    result of rounding is clamped to 0. On patterns without negatives (fp32 softmax outputs) it
    is the probes' recorded form bit for bit; the LLaMA checks' numbers moved in their last bits
    when the two forms became one (docs/architecture.md, "One Jensen-Shannon divergence")."""
    p, q = p.clamp_min(0), q.clamp_min(0)
    m = 0.5 * (p + q)
    kl = lambda a, b: (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)
    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0)
