"""The experiments E1-E4 and the toy sample-efficiency study, run from a recipe
(`study.recipes`). Each writes its runs under a directory, reuses complete runs and resumes
interrupted ones, and returns a JSON-serializable result (accuracies, and the paths of its runs).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

from study.recipes import Recipe
from toy_models.pipeline import pretrain, evaluate_run
from toy_models.runs import RunDir
from toy_models.tasks import MIX4, TaskSpec
from toy_models.training import TrainConfig
from tuning.pipeline import finetune, load_run

Progress = Callable[[int, int, dict], None]


def _ensure_pretrain(bases: Path, task: str, r: Recipe, prompt_len: int, progress: Progress | None) -> Path:
    """The base run for (task, recipe, slots) under `bases`, shared by the experiments that use it."""
    import hashlib
    import json
    key = json.dumps([task, r.preset, r.model, r.pretrain_steps, r.pretrain_lr, r.batch_size, r.length,
                      r.num_digits, r.eval_size, prompt_len], sort_keys=True)
    path = bases / f"{r.preset}-{task}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    run = RunDir(path)
    if run.complete:
        return path
    spec = TaskSpec(length=r.length, num_digits=r.num_digits, prompt_len=prompt_len)
    train = TrainConfig(steps=r.pretrain_steps, lr=r.pretrain_lr, warmup=min(200, r.pretrain_steps // 10),
                        batch_size=r.batch_size, eval_every=max(1, r.pretrain_steps // 10),
                        eval_size=r.eval_size)
    # an interrupted run continues; one killed before its first checkpoint starts afresh
    pretrain(path, task, r.preset, spec, train, model_overrides=r.model, resume=run.resumable,
             overwrite=not run.resumable, progress=progress)
    return path


def _ensure_finetune(base: Path, path: Path, method: str, task: str, opts: dict, r: Recipe, seed: int,
                     progress: Progress | None, steps: int | None = None) -> dict:
    run = RunDir(path)
    if not run.complete:
        steps = steps or r.tune_steps
        finetune(base, method, task, path, opts,
                 {"steps": steps, "seed": seed, "batch_size": r.batch_size,
                  "eval_every": max(1, steps // 5), "eval_size": r.eval_size,
                  "warmup": min(50, steps // 10)},
                 resume=run.resumable, overwrite=not run.resumable, progress=progress)
    return run.read_json("metrics.json")


def _mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def run_e1(out: Path, bases: Path, r: Recipe, progress: Progress | None = None) -> dict:
    """E1, 'cannot learn a new task': pretrained on ascending, tuned for descending."""
    base = _ensure_pretrain(bases, "ascending", r, 1, progress)
    methods = {
        "full": ("full", {}),
        "lora": ("lora", {"rank": 1}),
        "soft_prompt": ("soft_prompt", {"length": 1}),
        "prefix_none": ("prefix", {"length": 1, "share": "none"}),
        "prefix_simple": ("prefix", {"length": 1, "share": "simple"}),
        "prefix_deep": ("prefix", {"length": 1, "share": "deep"}),
    }
    acc: dict[str, list[float]] = {k: [] for k in methods}
    runs = {}
    for seed in r.seeds:
        for name, (method, opts) in methods.items():
            path = out / f"{name}-descending-s{seed}"
            acc[name].append(_ensure_finetune(base, path, method, "descending", opts, r, seed, progress)["exact_acc"])
            runs.setdefault(name, str(path))
    base_acc = evaluate_run(load_run(base), ["ascending", "descending"], r.eval_size)
    return {"experiment": "E1", "base": str(base), "runs": runs,
            "base_acc": {t: v["exact_acc"] for t, v in base_acc.items()},
            "descending_acc": {k: _mean_std(v) for k, v in acc.items()}}


def _prefix_per_task(out: Path, base: Path, tasks: list[str], P: int, r: Recipe, progress) -> tuple[dict, dict]:
    """One prefix per task, each evaluated on every task: the cross-task matrix (first seed)."""
    own: dict[str, list[float]] = {t: [] for t in tasks}
    runs = {}
    for seed in r.seeds:
        for t in tasks:
            path = out / f"prefix-{t}-s{seed}"
            own[t].append(_ensure_finetune(base, path, "prefix", t, {"length": P, "share": "simple"}, r, seed,
                                           progress)["exact_acc"])
            runs.setdefault(t, str(path))
    return own, runs


def run_e2(out: Path, bases: Path, r: Recipe, progress: Progress | None = None) -> dict:
    """E2, 'can extract a pretrained task': mix4 base, one P=1 prefix per task."""
    base = _ensure_pretrain(bases, "mix4", r, 1, progress)
    own, runs = _prefix_per_task(out, base, list(MIX4), 1, r, progress)
    matrix = {t: {k: v["exact_acc"] for k, v in evaluate_run(load_run(runs[t]), list(MIX4), r.eval_size).items()}
              for t in MIX4}
    base_acc = evaluate_run(load_run(base), ["mix4"], r.eval_size)["mix4"]["exact_acc"]
    return {"experiment": "E2", "base": str(base), "runs": runs, "base_mix4_acc_y1_given": base_acc,
            "own_task_acc": {t: _mean_std(v) for t, v in own.items()}, "cross_task": matrix}


def run_e3(out: Path, bases: Path, r: Recipe, progress: Progress | None = None) -> dict:
    """E3, 'new task, same attention': deeper mix4 base, P=10 prefixes."""
    # 12 slots, so that E4's P=12 prefix fits the same base; a P=10 prefix uses 10 of them
    base = _ensure_pretrain(bases, "mix4", r, 12, progress)
    tasks = list(MIX4) + ["ascending_add1", "double_hist"]
    own, runs = _prefix_per_task(out, base, tasks, 10, r, progress)
    return {"experiment": "E3", "base": str(base), "runs": runs,
            "acc": {t: _mean_std(v) for t, v in own.items()}}


def run_e4(out: Path, bases: Path, r: Recipe, progress: Progress | None = None) -> dict:
    """E4, prefix vs LoRA at equal budget on double_hist: rank-1 LoRA vs a prefix of equal size."""
    from tuning import make_method
    from tuning.pipeline import budget_match
    base = _ensure_pretrain(bases, "mix4", r, 12, progress)
    model = load_run(base).model
    lora_n = make_method("lora", model, rank=1).n_params
    P, prefix_n = budget_match(model, lora_n, "prefix", share="simple")
    acc: dict[str, list[float]] = {"lora": [], "prefix": []}
    runs = {}
    for seed in r.seeds:
        for name, method, opts in (("lora", "lora", {"rank": 1}), ("prefix", "prefix", {"length": P, "share": "simple"})):
            path = out / f"{name}-double_hist-s{seed}"
            acc[name].append(_ensure_finetune(base, path, method, "double_hist", opts, r, seed, progress)["exact_acc"])
            runs.setdefault(name, str(path))
    return {"experiment": "E4", "base": str(base), "runs": runs, "prefix_len": P,
            "params": {"lora": lora_n, "prefix": prefix_n},
            "double_hist_acc": {k: _mean_std(v) for k, v in acc.items()}}


EXPERIMENTS = {"E1": run_e1, "E2": run_e2, "E3": run_e3, "E4": run_e4}


def run_sample_efficiency(out: Path, bases: Path, r: Recipe, sizes: tuple[int, ...], task: str = "add1",
                          shares: tuple[str, ...] = ("none", "simple", "deep"), P: int = 1,
                          progress: Progress | None = None) -> dict:
    """The toy counterpart of [L]'s study (papers.md §6): accuracy of No-/Simple-/Deep-share
    prefixes on `task` against the number of training examples, on a mix4-pretrained base."""
    base = _ensure_pretrain(bases, "mix4", r, 1, progress)
    acc: dict[str, dict[str, list[float]]] = {s: {str(n): [] for n in sizes} for s in shares}
    for seed in r.seeds:
        for share in shares:
            for n in sizes:
                path = out / f"prefix-{share}-{task}-n{n}-s{seed}"
                run = RunDir(path)
                if not run.complete:
                    finetune(base, "prefix", task, path, {"length": P, "share": share},
                             {"steps": r.tune_steps, "seed": seed, "batch_size": r.batch_size, "train_size": n,
                              "eval_every": r.tune_steps, "eval_size": r.eval_size, "warmup": min(50, r.tune_steps // 10)},
                             resume=run.resumable, overwrite=not run.resumable, progress=progress)
                acc[share][str(n)].append(run.read_json("metrics.json")["exact_acc"])
    return {"experiment": "sample_efficiency", "task": task, "P": P, "sizes": list(sizes), "base": str(base),
            "acc": {s: {n: _mean_std(v) for n, v in by.items()} for s, by in acc.items()}}
