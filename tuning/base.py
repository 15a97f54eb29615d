"""What every tuning method shares: a small module of trainable tensors that turns into a
`MethodState` for the frozen base model's forward. The base model is never copied or mutated.

A method describes itself (tuning/options.py): its options, a few example option sets the tests
run it with, the option `budget_match` varies, its parameter count without building it, and a
short label for reports. A new method is one file declaring these plus one line in
tuning/registry.py; tests/tuning/test_method_registry.py then covers it."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from prefixlab_common.errors import UserError
from toy_models.model import MethodState, ToyTransformer
from tuning.options import Option, check_options


class Method(nn.Module):
    name: ClassVar[str]
    summary: ClassVar[str] = ""  # one line, for --help and docs
    options: ClassVar[tuple[Option, ...]] = ()
    # option sets the registry's tests train, save, load and count (at least one: {} is the defaults)
    examples: ClassVar[tuple[dict, ...]] = ({},)
    budget_option: ClassVar[str | None] = None  # what `budget_match` varies (None: a fixed size)
    slot_label: ClassVar[str] = "P"  # how reports label the positions it adds (prefix slots)
    # Training defaults of this method (merged under the user's options); see docs/methods.md.
    defaults: ClassVar[dict] = {}
    # the training options it reads (None: all); others given explicitly are refused
    train_options: ClassVar[tuple[str, ...] | None] = None
    searched: ClassVar[bool] = False  # True: `search` finds its state; no gradient training

    def __init__(self, model: ToyTransformer, **opts):
        super().__init__()
        # kept out of the module tree: the frozen base is shared, never a submodule of a method
        object.__setattr__(self, "base", model)
        self.opts = opts

    @classmethod
    def check(cls, opts: dict) -> None:
        check_options(cls.name, cls.options, opts)

    @classmethod
    def param_count(cls, model: ToyTransformer, **opts) -> int:
        """Trainable parameters of this method with `opts` on `model`, without building it."""
        raise NotImplementedError

    @classmethod
    def describe(cls, opts: dict) -> str:
        """A short label of a configured method, e.g. 'prefix (simple, P=2)'."""
        return cls.name

    def state(self) -> MethodState:
        raise NotImplementedError

    def search(self, model, task, spec, cfg) -> dict:
        """A `searched` method finds its state here (no optimizer); returns its search record."""
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
