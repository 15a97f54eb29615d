"""What the experiments' runs share: their bases, their tuning jobs and what they collect from them.

Each experiment module (`study.e1` ... `study.sample_eff`) holds the experiment's run, its rows
of the paper-vs-lab table (`study.table`) and names its report section (`reports.experiments`).

It imports nothing else of `study`: the experiment modules (`study.e1` ...) use it, and
`study.table` (the bottom layer of the study contract) imports those for their table rows. The one
shared step that needs the layers above, `study.experiments.run_jobs` (it hands a parallel study's
groups to `study.groups`), reaches the runs as their `run_jobs` argument.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

from prefixlab_common.progress import Progress
from toy_models.pipeline import pretrain, evaluate_run
from toy_models.runs import RunDir
from toy_models.tasks import TaskSpec, exact_ceiling, fixed_test_set, resolve_task
from toy_models.training import TrainConfig
from tuning.pipeline import load_run

# Recipe (study.recipes) appears in annotations only, as a string: importing it here would join
# study.table to study.recipes, which the study contract keeps independent.


# Which base each experiment pretrains: (task, prompt slots). E3 and E4 share theirs (12 slots,
# so that E4's P=12 prefix fits; E3's P=10 prefixes take 10 of them).
BASES = {"E1": ("ascending", 1), "E2": ("mix4", 1), "E3": ("mix4", 12), "E4": ("mix4", 12)}


def base_key(experiment: str, r: Recipe) -> str:
    """What identifies the base of `experiment` under recipe `r` (its directory name's hash)."""
    task, prompt_len = BASES[experiment]
    fields = [task, r.preset, r.model, r.pretrain_steps, r.pretrain_lr, r.batch_size, r.length,
              r.num_digits, r.eval_size, prompt_len, r.slots]
    if r.precision != "fp32":  # fp32 bases keep the keys they always had
        fields.append(r.precision)
    key = json.dumps(fields, sort_keys=True)
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
             overwrite=not run.resumable, progress=progress, slots=r.slots, device=device, precision=r.precision)
    return path


def _train(r: Recipe, method: str, seed: int, long: bool = False) -> dict:
    """A tuning run's options: the method's defaults (docs/methods.md), then the recipe's."""
    steps = r.steps_for(long)
    schedule = {"schedule": r.long_schedule} if long and r.long_schedule else {}
    return {"steps": steps, "seed": seed, "batch_size": r.batch_size, "eval_size": r.eval_size,
            "eval_every": max(1, steps // r.eval_points), **schedule, **r.tune.get(method, {})}


def _job(out: Path, name: str, method: str, task: str, opts: dict, r: Recipe, seed: int, long: bool = False) -> dict:
    return {"name": name, "method": method, "task": task, "out": out / f"{name}-s{seed}", "opts": opts,
            "train": _train(r, method, seed, long), "seed": seed, **precision_key(r)}


def precision_key(r: Recipe) -> dict:
    """A tuning job's precision key under recipe `r` (tuning.fused.finetune_many); none for fp32."""
    return {"precision": r.precision} if r.precision != "fp32" else {}


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


def base_accuracy(base: Path, r: Recipe) -> dict:
    """The base's exact accuracy on its pretraining task, with that task's ceiling on the same
    test set (mix4 with y1 given: 94.0 %, docs/papers.md §3b)."""
    run = load_run(base)
    task = resolve_task(run.config["task"], run.spec)
    test = fixed_test_set(task, run.spec, r.eval_size)
    acc = evaluate_run(run, [run.config["task"]], r.eval_size)[run.config["task"]]["exact_acc"]
    ceiling = exact_ceiling(task, test, task.ambiguous_first)
    return {"task": run.config["task"], "exact_acc": acc, "ceiling": ceiling, "of_ceiling": acc / ceiling,
            "y1_given": task.ambiguous_first}
