"""Full fine-tuning: every weight, as overrides of the base parameters (the base stays intact)."""

from __future__ import annotations

from torch import nn

from toy_models.model import MethodState
from tuning.base import Method


class FullFinetune(Method):
    name = "full"
    summary = "full fine-tuning: every weight, as overrides of the frozen base's parameters"
    # [P]'s recipe (AdamW, wd 0.1 on matrices, dropout on), with warmup + cosine decay.
    defaults = dict(lr=1e-3, weight_decay=0.1, train_mode=True)

    def __init__(self, model, generator=None):
        super().__init__(model)
        self.weights = nn.ParameterDict(
            {k.replace(".", "__"): nn.Parameter(v.detach().clone()) for k, v in model.named_parameters()})

    @classmethod
    def param_count(cls, model, **opts) -> int:
        return sum(p.numel() for p in model.parameters())

    @classmethod
    def describe(cls, opts: dict) -> str:
        return "full fine-tuning"

    def state(self) -> MethodState:
        return MethodState(weights={k.replace("__", "."): v for k, v in self.weights.items()})

    def no_decay(self, name, p):
        return p.ndim < 2 or name.endswith(("W_E", "W_pos"))
