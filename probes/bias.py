"""Bias decomposition (docs/papers.md §4, [P] §4): per head, the output at a content query is
    t^pt_i = sum_k A^pt_ik v_k + (1 - alpha_i) t_i,
a rescaled base output plus a bias along the prefix values v_k (read from hook_v at the P
non-content keys). Exact at layer 0; with P = 1 the bias always points along v_1, so the cosine
of the bias direction across inputs is 1. Outputs are read from hook_z ([batch, pos, head, d_head],
the per-head output before W_O).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from probes.common import Accumulator, Probe, accumulate, check_layers_heads, require_state
from toy_models.model import MethodState, ToyTransformer

TOL = 1e-5  # fp32, relative to the scale of the head outputs


@dataclass
class BiasResult:
    layers: list[int]
    heads: list[int]
    max_residual: Tensor  # [layer, head] max |t^pt - (1-alpha) t - sum_k A^pt_k v_k|
    rel_residual: Tensor  # [layer, head] the same, over max |t^pt|
    mean_bias_norm: Tensor  # [layer, head] mean ||sum_k A^pt_ik v_k||
    min_bias_cosine: Tensor  # [layer, head] min cosine of each bias vector with the mean direction
    mean_bias_direction: Tensor  # [layer, head, d_head] unit mean bias direction
    example_bias: Tensor  # [layer, head, T, d_head] bias vectors of the first input
    P: list[int]
    tol: float = TOL
    summary: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"probe": "bias", "layers": self.layers, "heads": self.heads, "tol": self.tol, "P": self.P,
                "max_residual": self.max_residual.tolist(), "rel_residual": self.rel_residual.tolist(),
                "mean_bias_norm": self.mean_bias_norm.tolist(),
                "min_bias_cosine": self.min_bias_cosine.tolist(), **self.summary}

    def tensors(self) -> dict[str, Tensor]:
        return {"bias.max_residual": self.max_residual, "bias.rel_residual": self.rel_residual,
                "bias.mean_bias_norm": self.mean_bias_norm, "bias.min_bias_cosine": self.min_bias_cosine,
                "bias.mean_bias_direction": self.mean_bias_direction, "bias.example_bias": self.example_bias}


class BiasAcc(Accumulator):
    def __init__(self, model: ToyTransformer, layers, heads, n_inputs: int, tol: float = TOL):
        self.layers, self.heads = check_layers_heads(model, layers, heads)
        self.names = [f"blocks.{l}.attn.{h}" for l in self.layers for h in ("hook_pattern", "hook_v", "hook_z")]
        nL, nH, Dh = len(self.layers), len(self.heads), model.cfg.d_head
        self.tol, self.n_inputs = tol, n_inputs
        self.max_res = torch.zeros(nL, nH)
        self.max_out = torch.zeros(nL, nH)
        self.norm_sum = torch.zeros(nL, nH, dtype=torch.float64)
        self.bias_sum = torch.zeros(nL, nH, Dh, dtype=torch.float64)
        self.biases: list[list[Tensor]] = [[] for _ in self.layers]  # kept per batch for the cosine pass
        self.rows = 0
        self.P, self.example = [], []

    def update(self, pair) -> None:
        B, T = pair.tokens.shape[0], pair.T
        heads, nH = self.heads, len(self.heads)
        for li, l in enumerate(self.layers):
            Apt_c, alpha, _ = pair.content_pattern(l)
            n = pair.n_pre(l)
            Apt = pair.method[f"blocks.{l}.attn.hook_pattern"][:, heads, -T:]  # [B, H, T, n+T]
            v_pre = pair.method[f"blocks.{l}.attn.hook_v"][:, :n][:, :, heads]  # [B, n, H, Dh]
            z_pt = pair.method[f"blocks.{l}.attn.hook_z"][:, -T:][:, :, heads]  # [B, T, H, Dh]
            z = pair.base[f"blocks.{l}.attn.hook_z"][:, :, heads]
            bias = torch.einsum("bhqk,bkhe->bqhe", Apt[..., :n], v_pre)
            content_mass = Apt_c[:, heads].sum(-1)  # = 1 - alpha, without cancellation
            resid = z_pt - content_mass.permute(0, 2, 1).unsqueeze(-1) * z - bias
            self.max_res[li] = torch.maximum(self.max_res[li], resid.abs().amax((0, 1, 3)))
            self.max_out[li] = torch.maximum(self.max_out[li], z_pt.abs().amax((0, 1, 3)))
            self.norm_sum[li] += bias.norm(dim=-1).sum((0, 1)).double()
            self.bias_sum[li] += bias.sum((0, 1)).double()
            self.biases[li].append(bias.reshape(-1, nH, bias.shape[-1]))
            if len(self.P) < len(self.layers):
                self.P.append(n)
                self.example.append(bias[0].permute(1, 0, 2))
        self.rows += B * T

    def finish(self) -> BiasResult:
        layers, P, tol, max_res = self.layers, self.P, self.tol, self.max_res
        nL, nH = len(layers), len(self.heads)
        direction = torch.nn.functional.normalize(self.bias_sum.float(), dim=-1)
        min_cos = torch.ones(nL, nH)
        for li in range(nL):
            if P[li] == 0:
                min_cos[li] = float("nan")  # no prefix keys: no bias direction to speak of
                continue
            allb = torch.cat(self.biases[li])  # [rows, H, Dh]
            norms = allb.norm(dim=-1, keepdim=True)
            nonzero = norms.squeeze(-1) > 0
            # normalise by hand: cosine_similarity's eps would spoil tiny (but exact) bias vectors
            cos = ((allb / norms.clamp_min(torch.finfo(allb.dtype).tiny)) * direction[li]).sum(-1)
            min_cos[li] = torch.where(nonzero, cos, torch.ones_like(cos)).amin(0)
        rel = max_res / self.max_out.clamp_min(1e-12)
        res = BiasResult(layers, self.heads, max_res, rel, (self.norm_sum / self.rows).float(), min_cos,
                         direction, torch.stack(self.example), P, tol)
        layer0 = layers.index(0) if 0 in layers else None
        res.summary = {
            "layer0_max_residual": None if layer0 is None else float(max_res[layer0].max()),
            "layer0_rel_residual": None if layer0 is None else float(rel[layer0].max()),
            "layer0_identity_holds": None if layer0 is None else bool(rel[layer0].max() <= tol),
            "layer0_min_bias_cosine": None if layer0 is None or P[layer0] != 1 else float(min_cos[layer0].min()),
            "n_inputs": self.n_inputs,
        }
        return res


def bias_decomposition(model: ToyTransformer, state: MethodState | None, tokens: Tensor,
                       layers: list[int] | None = None, heads: list[int] | None = None,
                       batch_size: int = 250, tol: float = TOL) -> BiasResult:
    state = require_state(state)
    acc = BiasAcc(model, layers, heads, int(tokens.shape[0]), tol)
    return accumulate(model, state, tokens, [acc], batch_size)[0]


PROBE = Probe("bias", "the bias decomposition t^pt = sum_k A^pt_k v_k + (1 - alpha) t (docs/papers.md §4)",
              accumulator=BiasAcc,
              verdict=lambda r: ("layer-0 bias decomposition", r.summary["layer0_identity_holds"],
                                 r.summary["layer0_rel_residual"]))
