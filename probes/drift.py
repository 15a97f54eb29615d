"""Per-layer drift: how far the residual stream under a method departs from the base model's, on
content positions. A prefix leaves layer 0's attention pattern relatively unchanged; this shows
where cross-layer effects begin (docs/papers.md §4)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from probes.common import Accumulator, Probe, accumulate, require_state
from prefixlab_common.attention import js_divergence
from toy_models.model import MethodState, ToyTransformer

JS_FLOOR = 1e-6


@dataclass
class DriftResult:
    resid_rel: Tensor  # [layer] mean ||resid_post^pt - resid_post|| / ||resid_post||
    attn_out_rel: Tensor  # [layer] the same for the attention block output
    pattern_js: Tensor  # [layer] mean JS divergence of the renormalized content pattern (all heads)
    summary: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"probe": "drift", "resid_rel": self.resid_rel.tolist(), "attn_out_rel": self.attn_out_rel.tolist(),
                "pattern_js": self.pattern_js.tolist(), **self.summary}

    def tensors(self) -> dict[str, Tensor]:
        return {"drift.resid_rel": self.resid_rel, "drift.attn_out_rel": self.attn_out_rel,
                "drift.pattern_js": self.pattern_js}


class DriftAcc(Accumulator):
    def __init__(self, model: ToyTransformer, n_inputs: int):
        L = self.L = model.cfg.n_layers
        self.names = [f"blocks.{l}.{h}" for l in range(L)
                      for h in ("hook_resid_post", "hook_attn_out", "attn.hook_pattern")]
        self.resid = torch.zeros(L, dtype=torch.float64)
        self.attn = torch.zeros(L, dtype=torch.float64)
        self.js = torch.zeros(L, dtype=torch.float64)
        self.rows, self.n_inputs = 0, n_inputs

    def update(self, pair) -> None:
        B, T = pair.tokens.shape[0], pair.T
        for l in range(self.L):
            for name, acc in (("hook_resid_post", self.resid), ("hook_attn_out", self.attn)):
                a = pair.base[f"blocks.{l}.{name}"]
                b = pair.method[f"blocks.{l}.{name}"][:, -T:]
                acc[l] += ((b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)).sum().double()
            renorm, _, A = pair.renormalized(l)
            self.js[l] += js_divergence(renorm, A).mean(1).sum().double()
        self.rows += B * T

    def finish(self) -> DriftResult:
        rows, js = self.rows, self.js
        res = DriftResult((self.resid / rows).float(), (self.attn / rows).float(), (js / rows).float())
        # fp32 noise puts JS of identical rows near 1e-8; drift means well above that
        first = next((l for l in range(self.L) if js[l] / rows > JS_FLOOR), None)
        res.summary = {"first_layer_with_pattern_drift": first, "n_inputs": self.n_inputs}
        return res


def layer_drift(model: ToyTransformer, state: MethodState | None, tokens: Tensor,
                batch_size: int = 250) -> DriftResult:
    state = require_state(state)
    return accumulate(model, state, tokens, [DriftAcc(model, int(tokens.shape[0]))], batch_size)[0]


PROBE = Probe("drift", "per-layer drift of the residual stream and the attention pattern from the base",
              accumulator=lambda model, layers, heads, n: DriftAcc(model, n))
