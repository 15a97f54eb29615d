"""What a method declares about itself (PEFT's tuner configs, one per method): each option's
name, type, default, help and where the default came from. The CLI, the report, `budget_match`
and the tests read these declarations from the registry (tuning/registry.py); nothing else
lists a method's options. Torch-free on purpose: it is plain data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefixlab_common.errors import UserError


# CLI spellings that are not --name: P is -P/--prefix-len on every command (--length could mean P
# or L, so it is only an old spelling that warns: cli.RENAMED)
FLAGS = {"length": "--prefix-len"}


def flag_of(name: str) -> str:
    """The command-line flag of the option `name`."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class Option:
    name: str  # the constructor's keyword; the CLI flag is --name with '-' for '_' (or FLAGS[name])
    type: type  # int, float or str (of each element when `many`)
    default: Any  # equals the constructor's default (tests/tuning/test_method_registry.py)
    help: str
    source: str  # where the default came from: a paper's section, or the lab's own measurement
    many: bool = False  # a comma-separated list on the command line, e.g. --tokens 11,3
    short: str | None = None  # a one-letter spelling, e.g. -P
    # the default in words where `default` is None but stands for a value the method computes or
    # picks (LoRA's alpha: r, so scale 1): the help and `prefixlab methods` show this, never "—"
    default_text: str | None = None

    @property
    def flag(self) -> str:
        return flag_of(self.name)

    def parse(self, text: str) -> Any:
        """A command-line value: `many` options split on commas into elements of `type`."""
        if not self.many:
            return self.type(text)
        parts = [t.strip() for t in str(text).split(",") if t.strip()]
        try:
            return [self.type(t) for t in parts]
        except ValueError:
            raise UserError(f"{self.flag} must be comma-separated {self.type.__name__} values, got {text!r}") from None


def check_options(method: str, declared: tuple[Option, ...], given: dict) -> None:
    """Every given option must be one the method declares (the one place this is checked)."""
    known = {o.name for o in declared}
    extra = sorted(set(given) - known)
    if extra:
        raise UserError(f"option {flag_of(extra[0])} does not apply to method {method}"
                        + (f" (its options: {', '.join(o.flag for o in declared)})" if declared else
                           " (it takes no options)"))
