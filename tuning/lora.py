"""LoRA: W + (alpha / r) * A @ B on chosen linear maps, merged into weight overrides per forward.

Default targets are [P]'s (docs/papers.md §1): attention output and both MLP layers, not q/k/v, so
attention scores stay frozen. B starts at zero, so the start is an exact no-op.
"""

from __future__ import annotations

import math

import einops
import torch
from torch import nn

from prefixlab_common.errors import UserError
from toy_models.model import MethodState
from tuning.base import Method, positive
from tuning.options import Option

# target -> (parameter name in a block, how the weight reads as a linear map in -> out)
TARGETS = {
    "q": "attn.W_Q", "k": "attn.W_K", "v": "attn.W_V",  # [head, d_model, d_head]: d_model -> head*d_head
    "o": "attn.W_O",  # [head, d_head, d_model]: head*d_head -> d_model
    "mlp_in": "mlp.W_in", "mlp_out": "mlp.W_out",  # plain [in, out]
}
DEFAULT_TARGETS = ("o", "mlp_in", "mlp_out")


def _as_linear(name: str, w: torch.Tensor) -> torch.Tensor:
    if name.endswith(("W_Q", "W_K", "W_V")):
        return einops.rearrange(w, "h d e -> d (h e)")
    if name.endswith("W_O"):
        return einops.rearrange(w, "h e d -> (h e) d")
    return w


def _from_linear(name: str, delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if name.endswith(("W_Q", "W_K", "W_V")):
        return einops.rearrange(delta, "d (h e) -> h d e", h=like.shape[0])
    if name.endswith("W_O"):
        return einops.rearrange(delta, "(h e) d -> h e d", h=like.shape[0])
    return delta


class LoRA(Method):
    name = "lora"
    summary = "LoRA: W + (alpha / r) A B on chosen linear maps (B starts at zero: an exact no-op)"
    options = (
        Option("rank", int, 1, "LoRA rank r", "[P] E4 (docs/papers.md §3b)", short="-r"),
        Option("alpha", float, None, "LoRA alpha: the update is scaled by alpha / r", "[P] E4: alpha 1 at rank 1",
               default_text="r (scale 1)"),
        Option("targets", str, DEFAULT_TARGETS, f"LoRA targets, of {', '.join(TARGETS)}",
               "[P] E4: attention output and both MLP layers, never q/k/v", many=True),
        Option("init_b", str, "zero", "LoRA B init: zero (a no-op start) or normal (N(0, 0.02²))",
               "PEFT's and [P]'s B = 0"),
    )
    examples = ({"rank": 2}, {"rank": 1, "targets": ["q", "k", "v", "o"]})
    budget_option = "rank"
    # [P]'s E4 protocol (docs/papers.md §3b): constant lr 5e-3, no warmup, model in eval mode, no decay.
    defaults = dict(lr=5e-3, weight_decay=0.0, train_mode=False, schedule="constant", warmup=0)

    def __init__(self, model, rank: int = 1, alpha: float | None = None, targets=DEFAULT_TARGETS,
                 init_b: str = "zero", generator: torch.Generator | None = None):
        rank = positive("LoRA rank r", rank)
        targets = tuple(targets)
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets:
            raise UserError(f"unknown LoRA target {bad[0] if bad else ''!r}; known: {', '.join(TARGETS)}")
        if model.cfg.attn_only and any(t.startswith("mlp") for t in targets):
            targets = tuple(t for t in targets if not t.startswith("mlp"))
        super().__init__(model, rank=rank, alpha=alpha if alpha is not None else float(rank),
                         targets=list(targets), init_b=init_b)
        self.scale = self.opts["alpha"] / rank
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        params = dict(model.named_parameters())
        for layer in range(model.cfg.n_layers):
            for t in targets:
                full = f"blocks.{layer}.{TARGETS[t]}"
                d_in, d_out = _as_linear(full, params[full]).shape
                key = full.replace(".", "__")
                a = torch.empty(d_in, rank)
                nn.init.normal_(a, std=1 / math.sqrt(d_in), generator=generator)
                b = torch.zeros(rank, d_out)
                if init_b != "zero":
                    nn.init.normal_(b, std=0.02, generator=generator)
                self.A[key], self.B[key] = nn.Parameter(a), nn.Parameter(b)

    @classmethod
    def param_count(cls, model, rank: int = 1, targets=DEFAULT_TARGETS, **opts) -> int:
        if model.cfg.attn_only:
            targets = [t for t in targets if not t.startswith("mlp")]
        params = dict(model.named_parameters())
        return sum(rank * sum(_as_linear(f"blocks.{l}.{TARGETS[t]}", params[f"blocks.{l}.{TARGETS[t]}"]).shape)
                   for l in range(model.cfg.n_layers) for t in targets if t in TARGETS)

    @classmethod
    def describe(cls, opts: dict) -> str:
        return f"LoRA (r={opts.get('rank', 1)})"

    def state(self) -> MethodState:
        params = dict(self.base.named_parameters())
        weights = {}
        for key in self.A:
            full = key.replace("__", ".")
            delta = self.scale * (self.A[key] @ self.B[key])
            weights[full] = params[full] + _from_linear(full, delta, params[full])
        return MethodState(weights=weights)
