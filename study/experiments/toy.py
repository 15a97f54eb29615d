"""What the toy experiments share: their bases, their tuning jobs and what they collect from them.

Each toy experiment (`e1` ... `e4`, `sample_eff`) is a module of this package holding its run, its
rows of the paper-vs-lab table and its declaration (`study.experiments.registry`); a toy run
reads its base and its recipe from here (`ToyStage` turns it into a stage function).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from engine.groups import train_groups_apart
from prefixlab_common.progress import Progress
from study.recipes import RECIPES, Recipe, recipe_precision
from toy_models.model import PRESETS as MODEL_SIZES
from toy_models.pretraining import pretrain, evaluate_run
from toy_models.runs import RunDir
from toy_models.tasks import TaskSpec, exact_ceiling, fixed_test_set, resolve_task
from toy_models.training import TrainConfig
from tuning.fused import finetune_many
from tuning.pipeline import load_run

# A base model: the task it is pretrained on and its prompt slots, e.g. ("mix4", 12)
Base = tuple[str, int]


def base_about(base: Base) -> str:
    """'mix4, 12 slots': a base as the base stages' titles name it."""
    task, slots = base
    return f"{task}, {slots} slot{'s' if slots > 1 else ''}"


def base_key(base: Base, r: Recipe) -> str:
    """What identifies `base` pretrained under recipe `r` (its directory name's hash)."""
    task, prompt_len = base
    fields = [task, r.preset, r.model, r.pretrain_steps, r.pretrain_lr, r.batch_size, r.length,
              r.num_digits, r.eval_size, prompt_len, r.slots]
    if r.precision != "fp32":  # fp32 bases keep the keys they always had
        fields.append(r.precision)
    key = json.dumps(fields, sort_keys=True)
    return f"{r.preset}-{task}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def stage_recipe(cfg: dict, experiment: str) -> Recipe:
    """The recipe a training stage's config names: its scale's, in the precision it records."""
    return replace(RECIPES[cfg["preset"]][experiment], precision=recipe_precision(cfg["recipe"]))


def bases_dir(stage_dir: Path) -> Path:
    """Where a study's bases live: shared by the experiments of one study directory."""
    return Path(stage_dir).parent.parent / "bases"


@dataclass(frozen=True)
class ToyStage:
    """A toy experiment's run(out, bases, recipe, config, progress, device) as a stage function
    (out/stages/<name>-<key>/, config, upstream results, progress, device): its bases beside the
    stages, its recipe the scale's `recipe` entry in the precision the config records."""
    run: Callable[..., dict]
    recipe: str

    def __call__(self, d: Path, cfg: dict, up: dict, progress: Progress | None = None, device=None) -> dict:
        return self.run(d, bases_dir(d), stage_recipe(cfg, self.recipe), cfg, progress, device)


# Seconds per training step at one thread and batch 64, per layer and unit of width, fitted to the
# stages of a `make demo` study (two workers of one thread each; docs/benchmarks.md, "One ETA for
# the study"): base-E3 662 s, sample_eff 4,013 s, E3 1,450 s, E2 170 s, base-E2 250 s. A tuning
# step costs TUNE_STEP of a pretraining step (no gradient reaches the frozen weights). The
# schedule's order and a fresh study's ETA (engine.progress.StudyEta, which rescales them by the
# stages finished) depend on them.
STEP_S = 3.2e-4
# a bf16 step at d=256 against this model (linear in the width, so it undercounts an fp32 step at
# d=256), at one thread as a study's workers run: base-E4 1,234 s and E4 1,945 s in that study give
# 0.9-1.1; base-E4 alone on a core (863 s) 0.66. At two threads bf16 pays more against fp32 at the
# same width (0.39 pretraining, 0.51 LoRA: docs/benchmarks.md, "Precision"). 0.5 with
# STEP_S = 2.5e-4 put a fresh clone's ETA 76 % off at half-way.
BF16_STEP = 0.9
TUNE_STEP = 0.55


def step_seconds(r: dict) -> float:
    """A pretraining step's seconds at one thread under a recipe (as `Recipe.to_dict` wrote it)."""
    m = {**MODEL_SIZES.get(r["preset"], {}), **r.get("model", {})}
    bf16 = BF16_STEP if r.get("precision") == "bf16" else 1.0
    return bf16 * STEP_S * m.get("n_layers", 1) * m.get("d_model", 64) * r.get("batch_size", 64) / 64


def tuning_estimate(cfg: dict, steps: Callable[[int, int], int]) -> float:
    """A toy experiment's seconds: steps(tune_steps, long_steps) per seed, at a tuning step's cost."""
    r = cfg["recipe"]
    tune, long = r["tune_steps"], r["long_steps"] or r["tune_steps"]
    return TUNE_STEP * step_seconds(r) * steps(tune, long) * len(r["seeds"])


def run_jobs(base: Path, jobs: list[dict], progress: Progress | None = None, device=None) -> list[dict]:
    """Each job's final metrics. Complete runs are reused, interrupted ones resumed; the jobs
    that share a method structure and a step count train fused, in one batched forward
    (`tuning.fused.finetune_many`). In a parallel study the stage's groups train as parallel
    tasks first (`engine.groups`); the call below then finds every run complete and reads it."""
    jobs = [{k: v for k, v in j.items() if k != "name"} for j in jobs]
    train_groups_apart(base, jobs, device)
    return finetune_many(base, jobs, progress, device)


def ensure_base(bases: Path, base: Base, r: Recipe, progress: Progress | None = None, device=None) -> dict:
    """Pretrain (or reuse) `base` under recipe `r`; returns its path, accuracy against its task's
    ceiling, and its loss curve."""
    path = ensure_pretrain(bases, base, r, progress, device)
    return {"base": str(path), "steps": RunDir(path).read_json("metrics.json")["steps"],
            "curve": curve(path), **base_accuracy(path, r)}


def ensure_pretrain(bases: Path, base: Base, r: Recipe, progress: Progress | None, device=None) -> Path:
    """The run of `base` under recipe `r` in `bases`, shared by the experiments that use it."""
    task, prompt_len = base
    path = bases / base_key(base, r)
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


def train_options(r: Recipe, method: str, seed: int, long: bool = False) -> dict:
    """A tuning run's options: the method's defaults (docs/methods.md), then the recipe's."""
    steps = r.steps_for(long)
    schedule = {"schedule": r.long_schedule} if long and r.long_schedule else {}
    return {"steps": steps, "seed": seed, "batch_size": r.batch_size, "eval_size": r.eval_size,
            "eval_every": max(1, steps // r.eval_points), **schedule, **r.tune.get(method, {})}


def job(out: Path, name: str, method: str, task: str, opts: dict, r: Recipe, seed: int, long: bool = False) -> dict:
    return {"name": name, "method": method, "task": task, "out": out / f"{name}-s{seed}", "opts": opts,
            "train": train_options(r, method, seed, long), "seed": seed, **precision_key(r)}


def precision_key(r: Recipe) -> dict:
    """A tuning job's precision key under recipe `r` (tuning.fused.finetune_many); none for fp32."""
    return {"precision": r.precision} if r.precision != "fp32" else {}


def curve(path: str | Path) -> list[list[float]]:
    """[step, loss, exact accuracy] at each evaluation of a run (the report's loss curves)."""
    return [[m["step"], m["loss"], m["exact_acc"]] for m in RunDir(path).metrics_rows()]


def collect(jobs: list[dict], metrics: list[dict]) -> tuple[dict, dict, dict]:
    """Per job name: accuracies over seeds (mean ± std), the first seed's run and its curve."""
    acc: dict[str, list[float]] = {}
    runs: dict[str, str] = {}
    for j, m in zip(jobs, metrics):
        acc.setdefault(j["name"], []).append(m["exact_acc"])
        runs.setdefault(j["name"], str(j["out"]))
    return {k: mean_std(v) for k, v in acc.items()}, runs, {k: curve(p) for k, p in runs.items()}


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def prefix_options(P: int, r: Recipe, share: str = "simple") -> dict:
    opts = {"length": P, "share": share}
    if r.prefix_init != "normal":
        opts["init"] = r.prefix_init
    return opts


def prompt_jobs(out: Path, name: str, task: str, prompt: dict, r: Recipe, seed: int) -> list[dict]:
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
        out[name] = {"acc": mean_std([p[3] for p in picks]), "length": [p[1] for p in picks],
                     "tokens": [p[2] for p in picks], "run": picks[0][4],
                     "by_length": {n: mean_std(v) for n, v in by_length[name].items()}}
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
