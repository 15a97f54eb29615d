"""The experiments E1-E4 and the toy sample-efficiency study, run from a recipe
(`study.recipes`). Each writes its runs under a directory, reuses complete runs and resumes
interrupted ones, and returns a JSON-serializable result (accuracies, and the paths of its runs).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from prefixlab_common.progress import Progress
from study.groups import train_groups_apart
from study.recipes import Recipe
from toy_models.pipeline import pretrain, evaluate_run
from toy_models.runs import RunDir
from toy_models.tasks import MIX4, TaskSpec, exact_ceiling, fixed_test_set, resolve_task, sample_batch
from toy_models.training import TrainConfig, evaluate, loss_on
from tuning import make_method
from tuning.fused import finetune_many
from tuning.pipeline import budget_match, load_run



# Which base each experiment pretrains: (task, prompt slots). E3 and E4 share theirs (12 slots,
# so that E4's P=12 prefix fits; E3's P=10 prefixes take 10 of them).
BASES = {"E1": ("ascending", 1), "E2": ("mix4", 1), "E3": ("mix4", 12), "E4": ("mix4", 12)}


def base_key(experiment: str, r: Recipe) -> str:
    """What identifies the base of `experiment` under recipe `r` (its directory name's hash)."""
    task, prompt_len = BASES[experiment]
    key = json.dumps([task, r.preset, r.model, r.pretrain_steps, r.pretrain_lr, r.batch_size, r.length,
                      r.num_digits, r.eval_size, prompt_len, r.slots], sort_keys=True)
    return f"{r.preset}-{task}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def ensure_base(bases: Path, experiment: str, r: Recipe, progress: Progress | None = None, device=None) -> dict:
    """Pretrain (or reuse) the base of `experiment`; returns its path, accuracy against its
    task's ceiling, and its loss curve."""
    path = _ensure_pretrain(bases, experiment, r, progress, device)
    return {"base": str(path), "steps": RunDir(path).read_json("metrics.json")["steps"],
            "curve": curve(path), **base_accuracy(path, r)}


def _ensure_pretrain(bases: Path, experiment: str, r: Recipe, progress: Progress | None, device=None) -> Path:
    """The base run of `experiment` under `bases`, shared by the experiments that use it."""
    task, prompt_len = BASES[experiment]
    path = bases / base_key(experiment, r)
    run = RunDir(path)
    if run.complete:
        return path
    spec = TaskSpec(length=r.length, num_digits=r.num_digits, prompt_len=prompt_len)
    train = TrainConfig(steps=r.pretrain_steps, lr=r.pretrain_lr, warmup=min(200, r.pretrain_steps // 10),
                        batch_size=r.batch_size, eval_every=max(1, r.pretrain_steps // 20),
                        eval_size=r.eval_size)
    # an interrupted run continues; one killed before its first checkpoint starts afresh
    pretrain(path, task, r.preset, spec, train, model_overrides=r.model, resume=run.resumable,
             overwrite=not run.resumable, progress=progress, slots=r.slots, device=device)
    return path


def _train(r: Recipe, method: str, seed: int, long: bool = False) -> dict:
    """A tuning run's options: the method's defaults (docs/methods.md), then the recipe's."""
    steps = r.steps_for(long)
    return {"steps": steps, "seed": seed, "batch_size": r.batch_size, "eval_size": r.eval_size,
            "eval_every": max(1, steps // r.eval_points), **r.tune.get(method, {})}


def _job(out: Path, name: str, method: str, task: str, opts: dict, r: Recipe, seed: int, long: bool = False) -> dict:
    return {"name": name, "method": method, "task": task, "out": out / f"{name}-s{seed}", "opts": opts,
            "train": _train(r, method, seed, long), "seed": seed}


def run_jobs(base: Path, jobs: list[dict], progress: Progress | None = None, device=None) -> list[dict]:
    """Each job's final metrics. Complete runs are reused, interrupted ones resumed; the jobs
    that share a method structure and a step count train fused, in one batched forward
    (`tuning.fused.finetune_many`). In a parallel study the stage's groups train as parallel
    tasks first (`study.groups`); the call below then finds every run complete and reads it."""
    jobs = [{k: v for k, v in j.items() if k != "name"} for j in jobs]
    train_groups_apart(base, jobs, device)
    return finetune_many(base, jobs, progress, device)


def curve(path: str | Path) -> list[list[float]]:
    """[step, loss, exact accuracy] at each evaluation of a run (the report's loss curves)."""
    return [[m["step"], m["loss"], m["exact_acc"]] for m in RunDir(path).metrics_rows()]


def _collect(jobs: list[dict], metrics: list[dict]) -> tuple[dict, dict, dict]:
    """Per job name: accuracies over seeds (mean ± std), the first seed's run and its curve."""
    acc: dict[str, list[float]] = {}
    runs: dict[str, str] = {}
    for j, m in zip(jobs, metrics):
        acc.setdefault(j["name"], []).append(m["exact_acc"])
        runs.setdefault(j["name"], str(j["out"]))
    return {k: _mean_std(v) for k, v in acc.items()}, runs, {k: curve(p) for k, p in runs.items()}


def _mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def _prefix(P: int, r: Recipe, share: str = "simple") -> dict:
    opts = {"length": P, "share": share}
    if r.prefix_init != "normal":
        opts["init"] = r.prefix_init
    return opts


def _prompt_jobs(out: Path, name: str, task: str, prompt: dict, r: Recipe, seed: int) -> list[dict]:
    """Hard prompts of length 1..P on `task` (tuning/prompt.py): searched, not trained; each search
    scores its candidates on one training batch of prompt["batch_size"] (no lr, steps or schedule)."""
    return [{"name": f"{name}|{n}", "method": "prompt", "task": task, "out": out / f"{name}-P{n}-s{seed}",
             "opts": {"length": n}, "train": {"batch_size": prompt["batch_size"], "eval_size": r.eval_size},
             "seed": seed} for n in range(1, prompt["P"] + 1)]


def best_prompts(jobs: list[dict], metrics: list[dict]) -> dict[str, dict]:
    """Per prompt name, "the best hard prompt of length <= P": for each seed the length whose
    search found the least training loss (chosen on the training batch, never on the test set; a tie
    goes to the shorter), its test accuracy over seeds, its length and tokens, the first seed's run,
    and each length's accuracy."""
    best: dict[str, dict[int, tuple]] = {}
    by_length: dict[str, dict[str, list[float]]] = {}
    for j, m in zip(jobs, metrics):
        name, n = j["name"].split("|")
        by_length.setdefault(name, {}).setdefault(n, []).append(m["exact_acc"])
        cur = best.setdefault(name, {}).get(j["seed"])
        if cur is None or m["search"]["train_loss"] < cur[0]:
            best[name][j["seed"]] = (m["search"]["train_loss"], int(n), m["search"]["tokens"], m["exact_acc"], str(j["out"]))
    out = {}
    for name, per_seed in best.items():
        picks = [per_seed[s] for s in per_seed]
        out[name] = {"acc": _mean_std([p[3] for p in picks]), "length": [p[1] for p in picks],
                     "tokens": [p[2] for p in picks], "run": picks[0][4],
                     "by_length": {n: _mean_std(v) for n, v in by_length[name].items()}}
    return out


def run_e1(out: Path, bases: Path, r: Recipe, progress: Progress | None = None, device=None,
           prompt: dict | None = None) -> dict:
    """E1, 'cannot learn a new task': pretrained on ascending, tuned for descending; with `prompt`
    ({"P", "batch_size"}), also the best hard prompt of length <= P ("prompt")."""
    base = _ensure_pretrain(bases, "E1", r, progress, device)
    methods = {
        "full": ("full", {}),
        "lora": ("lora", {"rank": 1}),
        "soft_prompt": ("soft_prompt", {"length": 1}),
        "prefix_none": ("prefix", _prefix(1, r, "none")),
        "prefix_simple": ("prefix", _prefix(1, r, "simple")),
        "prefix_deep": ("prefix", _prefix(1, r, "deep")),
    }
    jobs = [_job(out, name, method, "descending", opts, r, seed)
            for seed in r.seeds for name, (method, opts) in methods.items()]
    hard = [j for seed in r.seeds for j in _prompt_jobs(out, "prompt", "descending", prompt, r, seed)] if prompt else []
    metrics = run_jobs(base, jobs + hard, progress, device)
    acc, runs, curves = _collect(jobs, metrics[:len(jobs)])
    base_acc = evaluate_run(load_run(base), ["ascending", "descending"], r.eval_size)
    res = {"experiment": "E1", "base": str(base), "runs": runs, "curves": curves,
           "base_acc": {t: v["exact_acc"] for t, v in base_acc.items()}, "descending_acc": acc}
    if prompt:
        best = best_prompts(hard, metrics[len(jobs):])["prompt"]
        res["runs"]["prompt"] = best.pop("run")
        res["descending_acc"]["prompt"] = best.pop("acc")
        res["prompt"] = {"P": prompt["P"], **best}
    return res


def run_e2(out: Path, bases: Path, r: Recipe, progress: Progress | None = None, device=None,
           prompt: dict | None = None) -> dict:
    """E2, 'can extract a pretrained task': mix4 base, one P=1 prefix per task, each evaluated on
    every task (the cross-task matrix, first seed); with `prompt` ({"P", "batch_size"}), also the
    best hard prompt of length <= P for each task: can a hard token select a task as a virtual one does?"""
    base = _ensure_pretrain(bases, "E2", r, progress, device)
    jobs = [_job(out, f"prefix-{t}", "prefix", t, _prefix(1, r), r, seed) for seed in r.seeds for t in MIX4]
    hard = [j for seed in r.seeds for t in MIX4 for j in _prompt_jobs(out, f"prompt-{t}", t, prompt, r, seed)] if prompt else []
    metrics = run_jobs(base, jobs + hard, progress, device)
    acc, runs, curves = _collect(jobs, metrics[:len(jobs)])
    matrix = {t: {k: v["exact_acc"] for k, v in evaluate_run(load_run(runs[f"prefix-{t}"]), list(MIX4),
                                                             r.eval_size).items()} for t in MIX4}
    res = {"experiment": "E2", "base": str(base), "runs": {t: runs[f"prefix-{t}"] for t in MIX4},
           "curves": {t: curves[f"prefix-{t}"] for t in MIX4}, "base_acc": base_accuracy(base, r),
           "own_task_acc": {t: acc[f"prefix-{t}"] for t in MIX4}, "cross_task": matrix}
    if prompt:
        best = best_prompts(hard, metrics[len(jobs):])
        res["prompt_runs"] = {t: best[f"prompt-{t}"].pop("run") for t in MIX4}
        res["prompt"] = {"P": prompt["P"], **{k: {t: best[f"prompt-{t}"][k] for t in MIX4}
                                              for k in ("acc", "length", "tokens", "by_length")}}
    return res


E3_NEW = ("ascending_add1", "double_hist")  # new tasks: the long runs


def run_e3(out: Path, bases: Path, r: Recipe, progress: Progress | None = None, device=None) -> dict:
    """E3, 'new task, same attention': deeper mix4 base, P=10 prefixes on the pretraining tasks
    and on two new ones (the new ones train for `long_steps`)."""
    base = _ensure_pretrain(bases, "E3", r, progress, device)
    jobs = [_job(out, f"prefix-{t}", "prefix", t, _prefix(10, r), r, seed, long=t in E3_NEW)
            for seed in r.seeds for t in list(MIX4) + list(E3_NEW)]
    acc, runs, curves = _collect(jobs, run_jobs(base, jobs, progress, device))
    strip = lambda d: {k.removeprefix("prefix-"): v for k, v in d.items()}
    return {"experiment": "E3", "base": str(base), "runs": strip(runs), "curves": strip(curves),
            "base_acc": base_accuracy(base, r), "acc": strip(acc)}


def run_e4(out: Path, bases: Path, r: Recipe, progress: Progress | None = None, device=None) -> dict:
    """E4, prefix vs LoRA at equal budget on double_hist: rank-1 LoRA vs a prefix of equal size,
    both trained for `long_steps`."""
    base = _ensure_pretrain(bases, "E4", r, progress, device)
    model = load_run(base).model
    lora_n = make_method("lora", model, rank=1).n_params
    P, prefix_n = budget_match(model, lora_n, "prefix", share="simple")
    jobs = [_job(out, name, method, "double_hist", opts, r, seed, long=True) for seed in r.seeds
            for name, method, opts in (("lora", "lora", {"rank": 1}), ("prefix", "prefix", _prefix(P, r)))]
    acc, runs, curves = _collect(jobs, run_jobs(base, jobs, progress, device))
    return {"experiment": "E4", "base": str(base), "runs": runs, "curves": curves, "prefix_len": P,
            "params": {"lora": lora_n, "prefix": prefix_n}, "double_hist_acc": acc}


EXPERIMENTS = {"E1": run_e1, "E2": run_e2, "E3": run_e3, "E4": run_e4}


def base_accuracy(base: Path, r: Recipe) -> dict:
    """The base's exact accuracy on its pretraining task, with that task's ceiling on the same
    test set (mix4 with y1 given: 94.0 %, papers.md §3b)."""
    run = load_run(base)
    task = resolve_task(run.config["task"], run.spec)
    test = fixed_test_set(task, run.spec, r.eval_size)
    acc = evaluate_run(run, [run.config["task"]], r.eval_size)[run.config["task"]]["exact_acc"]
    ceiling = exact_ceiling(task, test, task.ambiguous_first)
    return {"task": run.config["task"], "exact_acc": acc, "ceiling": ceiling, "of_ceiling": acc / ceiling,
            "y1_given": task.ambiguous_first}


# [L]'s prefix parameterizations (papers.md §1): Deep-share as [L]'s vision code built it (one MLP
# per layer, hidden 48) and as Li & Liang built it (one MLP shared across layers, hidden 512)
SAMPLE_EFF_VARIANTS = {
    "none": {"share": "none"},
    "simple": {"share": "simple"},
    "deep48": {"share": "deep", "mlp": "per_layer", "hidden": 48},
    "deep512": {"share": "deep", "mlp": "shared", "hidden": 512},
}


def _size_name(n: int | None) -> str:
    return "fresh" if n is None else str(n)


def held_out_losses(path: str | Path, val, test) -> dict:
    """A tuned run's teacher-forced loss on the validation and test sets, and its exact accuracy
    on the validation set (the test accuracy is in its metrics)."""
    run = load_run(path)
    run.model.eval()
    with torch.no_grad():
        out = {"val_loss": loss_on(run.model, val, run.state).item(),
               "test_loss": loss_on(run.model, test, run.state).item()}
    out["val_acc"] = evaluate(run.model, run.state, val, greedy=False)["exact_acc"]
    return out


def validation_set(task_name: str, spec: TaskSpec, n: int, seed: int = 4321):
    """Inputs of the *train* split (never the test split) drawn on a stream no training pool uses:
    learning rates are chosen here, never on the test set ([L] grid-searched on a validation split)."""
    return sample_batch(resolve_task(task_name, spec), spec, n, np.random.default_rng([seed, 0x7A1]), split="train")


def run_sample_efficiency(out: Path, bases: Path, r: Recipe, cfg: dict, progress: Progress | None = None,
                          device=None) -> dict:
    """The toy counterpart of [L]'s claim (papers.md §6): No-, Simple- and Deep-share prefixes
    learning a task the base cannot do (E3's ascending_add1 on the E3/E4 base), each on a fixed
    pool of n training examples, n from tens to thousands, plus fresh data (n = None).

    Each variant gets its own learning rate, chosen from its grid by the validation loss at the
    smallest n (first seed), as [L] grid-searched per method; every variant starts at the base
    (init 'slot'). cfg: task, P, variants (names of SAMPLE_EFF_VARIANTS), sizes (null: fresh),
    seeds, steps, lr_grid {variant: [lr, ...]}, val_size."""
    base = _ensure_pretrain(bases, cfg["experiment"], r, progress, device)
    task, P, steps = cfg["task"], cfg["P"], cfg["steps"]
    sizes, seeds = list(cfg["sizes"]), list(cfg["seeds"])
    base_run = load_run(base)
    spec = base_run.spec
    val = validation_set(task, spec, cfg["val_size"])
    test = fixed_test_set(resolve_task(task, spec), spec, r.eval_size)

    def job(v: str, n: int | None, lr: float, seed: int) -> dict:
        train = {**_train(r, "prefix", seed), "steps": steps, "lr": lr, "schedule": "constant", "warmup": 0,
                 "eval_every": max(1, steps // 4), "train_size": n}
        return {"name": f"{v}|{_size_name(n)}|{lr:g}", "method": "prefix", "task": task, "seed": seed,
                "out": out / f"prefix-{v}-{task}-n{_size_name(n)}-lr{lr:g}-s{seed}",
                "opts": {"length": P, "init": "slot", **SAMPLE_EFF_VARIANTS[v]}, "train": train}

    held: dict[Path, dict] = {}  # the selection runs come back in step 2: their held-out losses once

    def measure(jobs: list[dict]) -> list[dict]:
        metrics = run_jobs(base, jobs, progress, device)
        for j in jobs:
            if j["out"] not in held:
                held[j["out"]] = held_out_losses(j["out"], val, test)
        return [{"acc": m["exact_acc"], **held[j["out"]]} for j, m in zip(jobs, metrics)]

    # 1. each variant's learning rate, on the validation split at the smallest n (first seed)
    grid_jobs = [job(v, sizes[0], lr, seeds[0]) for v in cfg["variants"] for lr in cfg["lr_grid"][v]]
    grid: dict[str, dict[str, dict]] = {}
    for j, m in zip(grid_jobs, measure(grid_jobs)):
        v, _, lr = j["name"].split("|")
        grid.setdefault(v, {})[lr] = {"val_loss": m["val_loss"], "val_acc": m["val_acc"]}
    chosen = {v: float(min(g, key=lambda lr: g[lr]["val_loss"])) for v, g in grid.items()}
    # 2. every size and seed at the chosen rate (the selection runs are reused, not retrained);
    # smallest n first, every variant and seed of a size together, so that a study stopped part
    # way keeps whole comparisons at the sizes where the claim lives (runs resume one by one)
    jobs = [job(v, n, chosen[v], seed) for n in sizes for seed in seeds for v in cfg["variants"]]
    by: dict[str, dict[str, dict[str, list[float]]]] = {}
    for j, m in zip(jobs, measure(jobs)):
        v, n, _ = j["name"].split("|")
        cell = by.setdefault(v, {}).setdefault(n, {})
        for k in ("acc", "test_loss", "val_loss"):
            cell.setdefault(k, []).append(m[k])
    stats = {v: {n: {k: _mean_std(xs) for k, xs in cell.items()} for n, cell in per.items()} for v, per in by.items()}
    n_params = {v: make_method("prefix", base_run.model, **{**SAMPLE_EFF_VARIANTS[v], "length": P}).n_params
                for v in cfg["variants"]}
    return {"experiment": "sample_efficiency", "task": task, "P": P, "steps": steps, "base": str(base),
            "base_acc": base_accuracy(base, r), "sizes": [_size_name(n) for n in sizes], "seeds": seeds,
            "variants": {v: SAMPLE_EFF_VARIANTS[v] for v in cfg["variants"]}, "n_params": n_params,
            "lr_grid": grid, "lr": chosen, "val_size": cfg["val_size"], "test_size": len(test),
            "acc": {v: {n: c["acc"] for n, c in per.items()} for v, per in stats.items()},
            "test_loss": {v: {n: c["test_loss"] for n, c in per.items()} for v, per in stats.items()},
            "runs": {f"{v}/{_size_name(n)}": str(job(v, n, chosen[v], seeds[0])["out"])
                     for v in cfg["variants"] for n in sizes}}
