"""Where a stage's independent groups of runs train (`tuning.fused.plan_groups`).

A sequential study trains them one after another inside the stage (`finetune_many`). A parallel
study (`engine.parallel`) installs a group runner for the stage it runs, with `use_group_runner`,
and the experiments hand it their groups first (`train_groups_apart`); `finetune_many` then finds
every run complete and reads it. This module sits below both: the experiments never import the
scheduler, and the scheduler never imports the experiments.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Callable, Iterator

from tuning.fused import plan_groups

# runner(base, [jobs of one group, ...], device) trains every group and returns when all are done
GroupRunner = Callable[[Path, list, object], None]
_RUNNER: contextvars.ContextVar = contextvars.ContextVar("group_runner", default=None)


@contextlib.contextmanager
def use_group_runner(runner: GroupRunner | None) -> Iterator[None]:
    """Inside this block, `train_groups_apart` hands a stage's groups to `runner`."""
    token = _RUNNER.set(runner)
    try:
        yield
    finally:
        _RUNNER.reset(token)


def group_steps(group: list[dict]) -> int:
    """A group's work in steps x runs (its runs train fused, so every run costs its steps)."""
    return sum((j.get("train") or {}).get("steps", 0) for j in group)


def train_groups_apart(base: Path, jobs: list[dict], device=None) -> None:
    """Under a group runner, train the independent groups of `jobs` through it, the longest
    first (so that they do not start last on a free worker); without one, do nothing."""
    runner = _RUNNER.get()
    if runner is None:
        return
    groups = sorted(([jobs[i] for i in g] for g in plan_groups(base, jobs, device)), key=lambda g: -group_steps(g))
    if len(groups) > 1:
        runner(base, groups, device)
