"""`prefixlab finetune --task a,b,c --seeds 0,1,2`: one method over several tasks and/or seeds,
fused by default (tuning/fused.py) or one run after another (tuning/pipeline.py).

Layout: with one task, `out/seed<N>` and `out/summary.json`; with several, `out/<task>` (one
seed) or `out/<task>/seed<N>` and `out/<task>/summary.json`."""

from __future__ import annotations

from pathlib import Path

from prefixlab_common.errors import UserError
from toy_models.lock import DirLock
from toy_models.runs import RunDir
from toy_models.training import Progress
from tuning.fused import finetune_many
from tuning.jobs import seeds_summary
from tuning.pipeline import finetune
from tuning.registry import check_method


def sweep(base, method: str, tasks: list[str], out, seeds: list[int] | None, opts=None, train=None,
          overwrite: bool = False, progress: Progress | None = None, fuse: bool = True, device=None,
          precision: str | None = None) -> dict:
    """Tune `method` for every task and seed. Returns {task: metrics, or the seeds' summary
    (per-seed exact accuracy, mean and sample std)}. precision: as `tuning.pipeline.finetune`."""
    check_method(method, opts)
    if not tasks:
        raise UserError("--task needs at least one task")
    if len(set(tasks)) != len(tasks):
        raise UserError(f"--task repeats a task: {','.join(tasks)}")
    if seeds is not None and not seeds:
        raise UserError("--seeds needs at least one seed, e.g. --seeds 0,1,2")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds repeats a seed: {seeds}")
    if len(tasks) == 1 and seeds is None:  # one run: the run directory is `out` itself
        return {tasks[0]: finetune(base, method, tasks[0], out, opts, train, overwrite=overwrite, progress=progress,
                                   device=device, precision=precision)}
    root = RunDir(out)
    root.check_new(overwrite, False, resumable=False)
    with DirLock(root.path, "finetune"):
        root.check_new(overwrite, False, resumable=False)
        return _sweep(base, method, tasks, Path(out), seeds, opts, train, overwrite, progress, fuse, device, precision)


def _sweep(base, method, tasks, out: Path, seeds, opts, train, overwrite, progress, fuse, device, precision) -> dict:
    home = {t: out if len(tasks) == 1 else out / t for t in tasks}
    jobs = []
    for t in tasks:
        for s in seeds or [None]:
            seed = s if s is not None else (train or {}).get("seed")
            jobs.append(dict(method=method, task=t, out=home[t] / f"seed{s}" if seeds else home[t], opts=opts,
                             train=train, seed=seed))
    if fuse:
        metrics = finetune_many(base, jobs, progress, device, overwrite=overwrite, precision=precision)
    else:
        metrics = [finetune(base, j["method"], j["task"], j["out"], j["opts"],
                            {**(j["train"] or {}), **({"seed": j["seed"]} if j["seed"] is not None else {})},
                            overwrite=overwrite, progress=progress, device=device, precision=precision) for j in jobs]
    res: dict = {}
    for t in tasks:
        per = {j["seed"]: m for j, m in zip(jobs, metrics) if j["task"] == t}
        res[t] = seeds_summary(RunDir(home[t]), method, t, seeds, per) if seeds else per[next(iter(per))]
    return res
