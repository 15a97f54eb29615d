"""Attention-pattern invariance (papers.md §4, [P] §4).

With prefix mass alpha_i = sum_k A^pt_ik over the P non-content keys, the identity is
    A^pt_ij = (1 - alpha_i) * A_ij    on content keys j,
i.e. the with-method pattern renormalized by (1 - alpha_i) equals the base pattern: a prefix
only rescales attention over the content, it cannot change the relative pattern. It is exact at
layer 0 for every prefix and soft prompt; deeper layers drift because earlier layers' outputs
change. Weight methods that touch q/k (full fine-tuning, LoRA on q/k) break it at layer 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from probes.common import check_layers_heads, paired_forwards, require_state
from toy_models.model import MethodState, ToyTransformer

TOL = 1e-5  # fp32


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (nats) between distributions on the last axis."""
    m = 0.5 * (p + q)
    kl = lambda a, b: (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)
    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0)


@dataclass
class InvarianceResult:
    layers: list[int]
    heads: list[int]
    max_abs_diff: Tensor  # [layer, head] max |A^pt/(1-alpha) - A| on content
    mean_js: Tensor  # [layer, head] mean Jensen-Shannon divergence of the rows
    frac_rows_within_tol: Tensor  # [layer, head]
    mean_prefix_mass: Tensor  # [layer, head] mean alpha over inputs and queries
    example_base: Tensor  # [layer, head, T, T] base pattern of the first input
    example_method: Tensor  # [layer, head, Q, K] with-method pattern of the first input (raw)
    n_pre: list[int]  # non-content keys per layer
    tol: float = TOL
    summary: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"probe": "invariance", "layers": self.layers, "heads": self.heads, "tol": self.tol,
                "max_abs_diff": self.max_abs_diff.tolist(), "mean_js": self.mean_js.tolist(),
                "frac_rows_within_tol": self.frac_rows_within_tol.tolist(),
                "mean_prefix_mass": self.mean_prefix_mass.tolist(), "n_pre": self.n_pre, **self.summary}

    def tensors(self) -> dict[str, Tensor]:
        return {"invariance.max_abs_diff": self.max_abs_diff, "invariance.mean_js": self.mean_js,
                "invariance.frac_rows_within_tol": self.frac_rows_within_tol,
                "invariance.mean_prefix_mass": self.mean_prefix_mass,
                "invariance.example_base": self.example_base, "invariance.example_method": self.example_method}


def attention_invariance(model: ToyTransformer, state: MethodState | None, tokens: Tensor,
                         layers: list[int] | None = None, heads: list[int] | None = None,
                         batch_size: int = 250, tol: float = TOL) -> InvarianceResult:
    state = require_state(state)
    layers, heads = check_layers_heads(model, layers, heads)
    names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    nL, nH = len(layers), len(heads)
    max_diff = torch.zeros(nL, nH)
    js_sum = torch.zeros(nL, nH, dtype=torch.float64)
    within = torch.zeros(nL, nH, dtype=torch.float64)
    alpha_sum = torch.zeros(nL, nH, dtype=torch.float64)
    rows = 0
    ex_base, ex_method, n_pre = [], [], []
    for pair in paired_forwards(model, state, tokens, names, batch_size):
        B, T = pair.tokens.shape
        for li, l in enumerate(layers):
            renorm, alpha, A = pair.renormalized(l)
            renorm, alpha, A = renorm[:, heads], alpha[:, heads], A[:, heads]
            row_diff = (renorm - A).abs().amax(-1)  # [B, H, T]
            max_diff[li] = torch.maximum(max_diff[li], row_diff.amax((0, 2)))
            js_sum[li] += js_divergence(renorm, A).sum((0, 2)).double()
            within[li] += (row_diff <= tol).sum((0, 2)).double()
            alpha_sum[li] += alpha.sum((0, 2)).double()
            if not ex_base or len(ex_base) < nL:
                ex_base.append(A[0])
                ex_method.append(pair.method[f"blocks.{l}.attn.hook_pattern"][0, heads])
                n_pre.append(pair.n_pre(l))
        rows += B * T
    res = InvarianceResult(layers, heads, max_diff, (js_sum / rows).float(), (within / rows).float(),
                           (alpha_sum / rows).float(), torch.stack(ex_base), torch.stack(ex_method),
                           n_pre, tol)
    layer0 = layers.index(0) if 0 in layers else None
    res.summary = {
        "layer0_max_abs_diff": None if layer0 is None else float(max_diff[layer0].max()),
        "layer0_invariant": None if layer0 is None else bool(max_diff[layer0].max() <= tol),
        "max_abs_diff_by_layer": {str(l): float(max_diff[i].max()) for i, l in enumerate(layers)},
        "n_inputs": int(tokens.shape[0]),
    }
    return res
