"""Attention-pattern invariance (docs/papers.md §4, [P] §4).

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

from prefixlab_common.attention import js_divergence
from probes.common import Accumulator, Probe, accumulate, check_layers_heads, require_state
from toy_models.model import MethodState, ToyTransformer

TOL = 1e-5  # fp32


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


class InvarianceAcc(Accumulator):
    def __init__(self, model: ToyTransformer, layers, heads, n_inputs: int, tol: float = TOL):
        self.layers, self.heads = check_layers_heads(model, layers, heads)
        self.names = [f"blocks.{l}.attn.hook_pattern" for l in self.layers]
        nL, nH = len(self.layers), len(self.heads)
        self.tol, self.n_inputs = tol, n_inputs
        self.max_diff = torch.zeros(nL, nH)
        self.js_sum = torch.zeros(nL, nH, dtype=torch.float64)
        self.within = torch.zeros(nL, nH, dtype=torch.float64)
        self.alpha_sum = torch.zeros(nL, nH, dtype=torch.float64)
        self.rows = 0
        self.ex_base, self.ex_method, self.n_pre = [], [], []

    def update(self, pair) -> None:
        B, T = pair.tokens.shape[0], pair.T
        heads = self.heads
        for li, l in enumerate(self.layers):
            renorm, alpha, A = pair.renormalized(l)
            renorm, alpha, A = renorm[:, heads], alpha[:, heads], A[:, heads]
            row_diff = (renorm - A).abs().amax(-1)  # [B, H, T]
            self.max_diff[li] = torch.maximum(self.max_diff[li], row_diff.amax((0, 2)))
            self.js_sum[li] += js_divergence(renorm, A).sum((0, 2)).double()
            self.within[li] += (row_diff <= self.tol).sum((0, 2)).double()
            self.alpha_sum[li] += alpha.sum((0, 2)).double()
            if len(self.ex_base) < len(self.layers):
                self.ex_base.append(A[0])
                self.ex_method.append(pair.method[f"blocks.{l}.attn.hook_pattern"][0, heads])
                self.n_pre.append(pair.n_pre(l))
        self.rows += B * T

    def finish(self) -> InvarianceResult:
        layers, rows, max_diff, tol = self.layers, self.rows, self.max_diff, self.tol
        res = InvarianceResult(layers, self.heads, max_diff, (self.js_sum / rows).float(),
                               (self.within / rows).float(), (self.alpha_sum / rows).float(),
                               torch.stack(self.ex_base), torch.stack(self.ex_method), self.n_pre, tol)
        layer0 = layers.index(0) if 0 in layers else None
        res.summary = {
            "layer0_max_abs_diff": None if layer0 is None else float(max_diff[layer0].max()),
            "layer0_invariant": None if layer0 is None else bool(max_diff[layer0].max() <= tol),
            "max_abs_diff_by_layer": {str(l): float(max_diff[i].max()) for i, l in enumerate(layers)},
            "n_inputs": self.n_inputs,
        }
        return res


def attention_invariance(model: ToyTransformer, state: MethodState | None, tokens: Tensor,
                         layers: list[int] | None = None, heads: list[int] | None = None,
                         batch_size: int = 250, tol: float = TOL) -> InvarianceResult:
    state = require_state(state)
    acc = InvarianceAcc(model, layers, heads, int(tokens.shape[0]), tol)
    return accumulate(model, state, tokens, [acc], batch_size)[0]


PROBE = Probe("invariance", "layer-0 attention invariance: A^pt / (1 - alpha) = A on content (docs/papers.md §4)",
              accumulator=InvarianceAcc,
              verdict=lambda r: ("layer-0 attention invariance", r.summary["layer0_invariant"],
                                 r.summary["layer0_max_abs_diff"]))
