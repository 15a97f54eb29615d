"""E2, 'can extract a pretrained task' ([P]): one P=1 prefix per task of a mix4 base.

Its run, its rows of the paper-vs-lab table and, last, its declaration (`study.experiments.declaration`).
"""

from __future__ import annotations

from pathlib import Path

from prefixlab_common.progress import Progress
from toy_models.pretraining import evaluate_run
from toy_models.tasks import MIX4
from tuning.pipeline import load_run
from study.experiments.declaration import Experiment
from study.experiments.toy import (base_accuracy, best_prompts, collect, ensure_pretrain, job, prefix_options,
                                   prompt_jobs, run_jobs, tuning_estimate)
from study.recipes import PROMPTING, Recipe
from study.rows import ms, of_ceiling, pct, row, tokens

BASE = ("mix4", 1)


def run(out: Path, bases: Path, r: Recipe, cfg: dict, progress: Progress | None = None, device=None) -> dict:
    """E2, 'can extract a pretrained task': mix4 base, one P=1 prefix per task, each evaluated on
    every task (the cross-task matrix, first seed); with cfg["prompt"] ({"P", "batch_size"}), also the
    best hard prompt of length <= P for each task: can a hard token select a task as a virtual one does?"""
    prompt = cfg.get("prompt")
    base = ensure_pretrain(bases, BASE, r, progress, device)
    jobs = [job(out, f"prefix-{t}", "prefix", t, prefix_options(1, r), r, seed) for seed in r.seeds for t in MIX4]
    hard = [j for seed in r.seeds for t in MIX4 for j in prompt_jobs(out, f"prompt-{t}", t, prompt, r, seed)] if prompt else []
    metrics = run_jobs(base, jobs + hard, progress, device)
    acc, runs, curves = collect(jobs, metrics[:len(jobs)])
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


PROMPT_TOLERANCE = 0.05  # a trained P=1 prefix is not the best one: a hard prompt may beat it by this


def prompt_e2_row(e2: dict) -> dict:
    """Hard prompting on E2, the lab's own measurement ([P] reports no hard prompt on its toys):
    can a hard token select a pretrained task as well as a virtual one? The criterion is [P]'s
    hierarchy: on every task the best hard prompt is at most the P=1 prefix plus a tolerance."""
    hard, own, p = e2["prompt"]["acc"], e2["own_task_acc"], e2["prompt"]
    over = {t: hard[t]["mean"] - own[t]["mean"] for t in hard}
    worst = max(over, key=lambda t: over[t])
    lab = (", ".join(f"{t} {ms(v)} {tokens(p['tokens'][t][0])}" for t, v in hard.items())
           + "; P=1 prefix " + ", ".join(f"{t} {ms(own[t])}" for t in hard))
    return row("[P] E2", f"a hard prompt (best of length ≤ {p['P']}) selects a pretrained task at most as well as "
                "the P=1 prefix", "not reported in [P] (the lab's measurement); prompting ⊆ prefix-tuning", lab,
                all(hard[t]["mean"] <= own[t]["mean"] + PROMPT_TOLERANCE for t in hard),
                f"hard ≤ prefix + {100 * PROMPT_TOLERANCE:.0f} pp on every task",
                f"{worst}: hard − prefix {100 * over[worst]:+.1f} pp")


def rows(e2: dict) -> list[dict]:
    own = e2["own_task_acc"]
    low = min(v["mean"] for v in own.values())
    rows = [row("[P] E2", "each task's P=1 prefix solves its own pretrained task (min over 4)", "≥ 83.7 %",
                 ", ".join(f"{t} {ms(v)}" for t, v in own.items()) + f" (base: {of_ceiling(e2['base_acc'])})",
                 low >= 0.75, "min ≥ 75 %",
                 f"min {100 * (low - 0.837):+.1f} pp")]
    off = max(v for t, accs in e2["cross_task"].items() for u, v in accs.items() if u != t)
    rows.append(row("[P] E2", "… and ≈ 0 on the other tasks (max off-diagonal)", "≈ 0 %", pct(off),
                     off <= 0.05, "≤ 5 %", f"{100 * off:+.1f} pp"))
    if "prompt" in e2:
        rows.append(prompt_e2_row(e2))
    return rows


def config(scale: str, recipes: dict[str, Recipe]) -> dict:
    return {"preset": scale, "recipe": recipes["E2"].to_dict(), "prompt": PROMPTING[scale]}


EXPERIMENT = Experiment(
    name="E2", title="E2: extracting pretrained tasks from mix4 with P=1 prefixes and hard prompts", run=run,
    config=config, rows=rows, estimate=lambda cfg: tuning_estimate(cfg, lambda tune, long: 4 * tune), section="e2",
    base=BASE, recipe="E2")
