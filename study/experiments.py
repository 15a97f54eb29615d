"""The experiments E1-E4 and the toy sample-efficiency study, run from a recipe
(`study.recipes`). Each writes its runs under a directory, reuses complete runs and resumes
interrupted ones, and returns a JSON-serializable result (accuracies, and the paths of its runs).

Each experiment is one module (`study.e1`, `study.e2`, `study.e3`, `study.e4`, `study.sample_eff`)
holding its run and its table rows; what their runs share is in `study.runkit`. This module adds the
one shared step that needs the layers below it, `run_jobs`, and gives each run it (`EXPERIMENTS`).
"""

from __future__ import annotations

import functools
from pathlib import Path

from prefixlab_common.progress import Progress
from study import e1, e2, e3, e4, sample_eff
from study.groups import train_groups_apart
from study.runkit import BASES, base_accuracy, base_key, best_prompts, curve, ensure_base  # noqa: F401  (re-exported for study.stages)
from study.sample_eff import SAMPLE_EFF_VARIANTS, held_out_losses, validation_set  # noqa: F401
from tuning.fused import finetune_many


def run_jobs(base: Path, jobs: list[dict], progress: Progress | None = None, device=None) -> list[dict]:
    """Each job's final metrics. Complete runs are reused, interrupted ones resumed; the jobs
    that share a method structure and a step count train fused, in one batched forward
    (`tuning.fused.finetune_many`). In a parallel study the stage's groups train as parallel
    tasks first (`study.groups`); the call below then finds every run complete and reads it."""
    jobs = [{k: v for k, v in j.items() if k != "name"} for j in jobs]
    train_groups_apart(base, jobs, device)
    return finetune_many(base, jobs, progress, device)


def _with_run_jobs(run):
    """An experiment module's `run` with this module's `run_jobs`."""
    @functools.wraps(run)
    def fn(*args, **kwargs) -> dict:
        return run(*args, run_jobs=run_jobs, **kwargs)
    return fn


run_e1, run_e2, run_e3, run_e4 = (_with_run_jobs(m.run) for m in (e1, e2, e3, e4))
run_sample_efficiency = _with_run_jobs(sample_eff.run)

EXPERIMENTS = {"E1": run_e1, "E2": run_e2, "E3": run_e3, "E4": run_e4}
