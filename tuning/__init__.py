"""Tuning methods: one small file each, and the registry (tuning/registry.py). A method produces
a `MethodState` that the frozen base model's forward accepts; every gradient-trained method trains
through toy_models.training.fit (one run) or toy_models.batched.fit_many (a fused group of runs),
a searched one (the hard prompt) through its own `search`.

Inside the package imports go one way: methods -> registry -> jobs (the run lifecycle) ->
pipeline (one run, loading) | fused (many runs) -> sweep (tasks x seeds)."""

from __future__ import annotations

from tuning.base import Method
from tuning.full import FullFinetune
from tuning.lora import LoRA
from tuning.prefix import Prefix
from tuning.prompt import HardPrompt
from tuning.registry import METHODS, make_method, method_class
from tuning.soft_prompt import SoftPrompt, hard_prompt_state
from tuning.pipeline import budget_match, finetune, load_run, load_tuned  # noqa: E402 (after the registry)

__all__ = ["METHODS", "Method", "FullFinetune", "LoRA", "Prefix", "SoftPrompt", "HardPrompt",
           "hard_prompt_state", "make_method", "method_class", "finetune", "load_run", "load_tuned",
           "budget_match"]
