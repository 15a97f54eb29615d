"""The method registry: every method the lab knows, by name. A new method is its own file
(declaring its options, examples and parameter count: tuning/base.py) plus one line here."""

from __future__ import annotations

from prefixlab_common.errors import UserError
from tuning.base import Method
from tuning.full import FullFinetune
from tuning.lora import LoRA
from tuning.prefix import Prefix
from tuning.prefix_plus import PrefixPlus
from tuning.prompt import HardPrompt
from tuning.soft_prompt import SoftPrompt

METHODS: dict[str, type[Method]] = {m.name: m for m in (FullFinetune, LoRA, SoftPrompt, Prefix, HardPrompt, PrefixPlus)}


def method_class(name: str) -> type[Method]:
    """The method called `name`: the one place an unknown method name is refused."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def check_method(name: str, opts: dict | None) -> type[Method]:
    """The method and its options (names only; values are checked when it is built)."""
    cls = method_class(name)
    cls.check(dict(opts or {}))
    return cls


def make_method(name: str, model, **opts) -> Method:
    generator = opts.pop("generator", None)
    cls = check_method(name, opts)
    return cls(model, generator=generator, **opts)


def options_by_flag() -> dict[str, list]:
    """Each option name with the (method, Option) pairs that declare it: one CLI flag serves every
    method that has an option of that name (tests/tuning/test_method_registry.py: same type and spelling)."""
    out: dict[str, list] = {}
    for cls in METHODS.values():
        for o in cls.options:
            out.setdefault(o.name, []).append((cls.name, o))
    return out
