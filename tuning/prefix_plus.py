"""Prefix-Tuning+ (Wang et al., arXiv 2506.13674; docs/papers.md §7): the prefix moved out of the
attention head. Each head of each chosen layer gets a trainable memory M [r, d_head]; its output
z_i (after the softmax, before W_O) becomes z_i + φ(q_i)ᵀM, with φ a positive feature map of the
head's query. The attention scores and pattern are the base model's: only the head output changes.

- `feature`: φ = elu(x) + 1 (linear attention's map; the lab's choice) or relu.
- `width`: None, φ reads q itself (r = d_head, M [d_head, d_head] per head); r, φ reads q W_φ
  with a trainable W_φ [d_head, r] per head (r·d_head more parameters), the lab's size knob.
- `layers`: all, shallow (layer 0) or a comma list of layer indices.
- `init`: zero (M = 0, an exact no-op start, as LoRA's B = 0) or normal (N(0, s²)).
Parameters: n_layers_chosen · n_heads · r · d_head · (2 with a width, else 1).
"""

from __future__ import annotations

import torch
from torch import nn

from prefixlab_common.errors import UserError
from toy_models.model import FEATURES, MethodState, memory_weights
from tuning.base import Method, positive
from tuning.options import Option

INITS = ("zero", "normal")


def parse_layers(layers: str, n_layers: int) -> list[int]:
    """'all', 'shallow' (layer 0) or a comma list '0,2' -> sorted layer indices (UserError if bad)."""
    text = str(layers).strip()
    if text == "all":
        return list(range(n_layers))
    if text == "shallow":
        return [0]
    try:
        out = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise UserError(f"prefix_plus layers must be all, shallow or a comma list of layer indices, got {layers!r}") from None
    if not out or out[0] < 0 or out[-1] >= n_layers:
        raise UserError(f"prefix_plus layers {layers!r} are not in 0..{n_layers - 1}")
    return out


class PrefixPlus(Method):
    name = "prefix_plus"
    summary = "Prefix-Tuning+: each head's output gets φ(q)ᵀM, a trainable memory outside the softmax (docs/papers.md §7)"
    options = (
        Option("feature", str, "elu", "prefix_plus: feature map φ, elu (elu(x)+1) or relu",
               "the lab's choice: linear attention's elu(x)+1 (docs/papers.md §7)"),
        Option("width", int, None, "prefix_plus: width r of φ (a trainable d_head -> r map before φ)",
               "the lab's choice (docs/methods.md)", default_text="d_head (φ on q itself)"),
        Option("layers", str, "all", "prefix_plus: all, shallow (layer 0) or a comma list of layers",
               "as [P]'s prefix: every layer"),
        Option("init", str, "zero", "prefix_plus init of M: zero (an exact no-op start) or normal",
               "the lab's choice, as LoRA's B = 0"),
        Option("init_scale", float, 0.02, "prefix_plus --init normal: std of M", "the lab's choice"),
    )
    examples = ({}, {"width": 2, "layers": "shallow"}, {"feature": "relu", "layers": "0", "init": "normal"})
    budget_option = "width"
    # a context method: the prefix's recipe (constant lr, no warmup, no decay, eval mode)
    defaults = dict(lr=1e-2, weight_decay=0.0, train_mode=False, schedule="constant", warmup=0)

    def __init__(self, model, feature: str = "elu", width: int | None = None, layers: str = "all",
                 init: str = "zero", init_scale: float = 0.02, generator: torch.Generator | None = None):
        if feature not in FEATURES:
            raise UserError(f"unknown prefix_plus feature {feature!r}; use one of {', '.join(FEATURES)}")
        if width is not None:
            width = positive("prefix_plus width r", width)
        if init not in INITS:
            raise UserError(f"unknown prefix_plus init {init!r}; use one of {', '.join(INITS)}")
        cfg = model.cfg
        chosen = parse_layers(layers, cfg.n_layers)
        canon = "all" if len(chosen) == cfg.n_layers else ",".join(map(str, chosen))
        super().__init__(model, feature=feature, width=width, layers=canon, init=init, init_scale=init_scale)
        self.layer_ids = chosen
        H, Dh = cfg.n_heads, cfg.d_head
        r = width if width is not None else Dh
        M = torch.zeros(len(chosen), H, r, Dh)
        if init == "normal":
            M = torch.randn(M.shape, generator=generator) * init_scale
        self.M = nn.Parameter(M)
        if width is not None:  # N(0, 1/d_head): φ's input keeps q's scale
            self.proj = nn.Parameter(torch.randn(len(chosen), H, Dh, width, generator=generator) * Dh ** -0.5)

    @classmethod
    def param_count(cls, model, width: int | None = None, layers: str = "all", **opts) -> int:
        cfg = model.cfg
        L = len(parse_layers(layers, cfg.n_layers))
        r = width if width is not None else cfg.d_head
        return L * cfg.n_heads * r * cfg.d_head * (2 if width is not None else 1)

    @classmethod
    def describe(cls, opts: dict) -> str:
        r = opts.get("width")
        layers = opts.get("layers", "all")
        return (f"prefix+ ({opts.get('feature', 'elu')}" + (f", r={r}" if r is not None else "")
                + ("" if layers == "all" else f", layers {layers}") + ")")

    def state(self) -> MethodState:
        n = self.base.cfg.n_layers
        memory: list = [None] * n
        proj: list = [None] * n
        for i, l in enumerate(self.layer_ids):
            memory[l] = self.M[i]
            proj[l] = self.proj[i] if hasattr(self, "proj") else None
        # as reserved weight names: fused runs stack them under vmap, as LoRA's (toy_models/model.py)
        return MethodState(weights=memory_weights(memory, proj, self.opts["feature"]))

    def fold(self):
        """Refused: a prefix's keys/values act inside the softmax, scaled by the mass they take;
        φ(q)ᵀM is added outside it, so no prefix (nor soft prompt) gives the same outputs."""
        raise UserError("prefix_plus cannot fold into a prefix: its term φ(q)ᵀM is added outside the softmax, "
                        "where no prefix keys/values put it (docs/papers.md §7)")
