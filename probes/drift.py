"""Per-layer drift: how far the residual stream under a method departs from the base model's, on
content positions. A prefix leaves layer 0's attention pattern relatively unchanged; this shows
where cross-layer effects begin (papers.md §4)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from probes.common import paired_forwards, require_state
from probes.invariance import js_divergence
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


def layer_drift(model: ToyTransformer, state: MethodState | None, tokens: Tensor,
                batch_size: int = 250) -> DriftResult:
    state = require_state(state)
    L = model.cfg.n_layers
    names = [f"blocks.{l}.{h}" for l in range(L) for h in ("hook_resid_post", "hook_attn_out", "attn.hook_pattern")]
    resid = torch.zeros(L, dtype=torch.float64)
    attn = torch.zeros(L, dtype=torch.float64)
    js = torch.zeros(L, dtype=torch.float64)
    rows = 0
    for pair in paired_forwards(model, state, tokens, names, batch_size):
        B, T = pair.tokens.shape
        for l in range(L):
            for name, acc in (("hook_resid_post", resid), ("hook_attn_out", attn)):
                a = pair.base[f"blocks.{l}.{name}"]
                b = pair.method[f"blocks.{l}.{name}"][:, -T:]
                acc[l] += ((b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)).sum().double()
            renorm, _, A = pair.renormalized(l)
            js[l] += js_divergence(renorm, A).mean(1).sum().double()
        rows += B * T
    res = DriftResult((resid / rows).float(), (attn / rows).float(), (js / rows).float())
    # fp32 noise puts JS of identical rows near 1e-8; drift means well above that
    first = next((l for l in range(L) if js[l] / rows > JS_FLOOR), None)
    res.summary = {"first_layer_with_pattern_drift": first, "n_inputs": int(tokens.shape[0])}
    return res
