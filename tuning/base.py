"""What every tuning method shares: a small module of trainable tensors that turns into a
`MethodState` for the frozen base model's forward. The base model is never copied or mutated."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from toy_models.errors import UserError
from toy_models.model import MethodState, ToyTransformer


class Method(nn.Module):
    name: ClassVar[str]
    # Training defaults of this method (merged under the user's options); see docs/methods.md.
    defaults: ClassVar[dict] = {}

    def __init__(self, model: ToyTransformer, **opts):
        super().__init__()
        # kept out of the module tree: the frozen base is shared, never a submodule of a method
        object.__setattr__(self, "base", model)
        self.opts = opts

    def state(self) -> MethodState:
        raise NotImplementedError

    def export(self) -> dict[str, torch.Tensor]:
        """The tensors that are saved (and reloaded with `load_export`)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_export(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        if set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
            raise UserError(f"the saved {self.name} tensors do not match this method and base model")
        self.load_state_dict(tensors)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a method holds only what it trains

    def no_decay(self, name: str, p: torch.Tensor) -> bool:
        return True  # context methods train without weight decay by default

    def config(self) -> dict:
        return {"name": self.name, **self.opts}


def positive(name: str, value: int) -> int:
    if value is None or value <= 0:
        raise UserError(f"{name} must be positive, got {value}")
    return int(value)
