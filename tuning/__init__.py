"""Tuning methods: one small file each, and the registry. A method produces a `MethodState` that
the frozen base model's forward accepts; every method trains through toy_models.training.fit."""

from __future__ import annotations

from tuning.base import Method
from tuning.full import FullFinetune
from tuning.lora import LoRA
from tuning.prefix import Prefix
from tuning.soft_prompt import SoftPrompt, hard_prompt_state

METHODS: dict[str, type[Method]] = {m.name: m for m in (FullFinetune, LoRA, SoftPrompt, Prefix)}

__all__ = ["METHODS", "Method", "FullFinetune", "LoRA", "Prefix", "SoftPrompt", "hard_prompt_state",
           "make_method", "finetune", "load_run", "load_tuned", "budget_match"]


def make_method(name, model, **opts):
    from toy_models.errors import UserError
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name](model, **opts)


def __getattr__(attr):  # the pipeline functions import lazily (they pull in the run store)
    if attr in ("finetune", "load_run", "load_tuned", "budget_match", "finetune_seeds"):
        from tuning import pipeline
        return getattr(pipeline, attr)
    raise AttributeError(attr)
