"""[PT+] E1: Prefix-Tuning+ on E1's ascending base, tuned for descending at the E1 prefixes' budget
(the recipe's tune_steps): its defaults (every layer, r = d_head) and width 1 (the No-share P=1
prefix's count), and how far its bias direction moves with the query.

Its run, its rows of the paper-vs-lab table and, last, its declaration (`study.experiments.declaration`).
"""

from __future__ import annotations

from pathlib import Path

from prefixlab_common.progress import Progress
from toy_models.tasks import fixed_test_set, resolve_task
from tuning.pipeline import load_run
from study.experiments import e1
from study.experiments.declaration import Experiment
from study.experiments.prefix_plus.common import PAPER, toy_config, tune
from study.experiments.toy import tuning_estimate
from study.recipes import Recipe
from study.rows import ms, row
# Lazy import: model_checks.prefix_plus (transformers) inside bias_spread, so planning a study never imports it.

VARIANTS = {"plus": ({}, "defaults: every layer, r = d_head"), "plus_w1": ({"width": 1}, "width 1: the No-share P=1 count")}
SPREAD_INPUTS = 256  # test inputs of the bias-direction probe
SPREAD_MAX = 0.99  # a mean cosine below this: the bias direction moves with the query


def bias_spread(run_path: str, task: str, n: int) -> dict:
    """How much a trained [PT+]'s bias direction moves with the query (`query_bias_spread`): per
    layer and head, the mean pairwise cosine over positions of φ(q_i)ᵀM on `n` test inputs of `task`
    (a one-slot prefix's is 1: one direction per head)."""
    from model_checks.prefix_plus import query_bias_spread
    run = load_run(run_path)
    batch = fixed_test_set(resolve_task(task, run.spec), run.spec, n)
    cos = query_bias_spread(run.model, run.state, batch.content)["mean_cosine"]
    return {"mean": float(cos.mean()), "min": float(cos.min()), "max": float(cos.max()), "per_head": cos.tolist()}


def run(out: Path, bases: Path, r: Recipe, cfg: dict, progress: Progress | None = None, device=None) -> dict:
    named = [(k, "descending", opts, False) for k, (opts, _) in VARIANTS.items()]
    base, acc, runs, curves, params = tune(out, bases, e1.BASE, r, named, progress, device)
    return {"experiment": "PT+E1", "base": str(base), "runs": runs, "curves": curves, "params": params,
            "descending_acc": acc, "bias_cosine": bias_spread(runs["plus"], "descending", min(SPREAD_INPUTS, r.eval_size))}


def rows(res: dict) -> list[dict]:
    acc, n = res["descending_acc"], res["params"]
    out = []
    for k, (_, label) in VARIANTS.items():
        a = acc[k]["mean"]
        out.append(row("[PT+] E1", f"[PT+] ({label}, {n[k]:,} params) cannot learn descending either", PAPER,
                       ms(acc[k]), a <= 0.05, "≤ 5 %: the attention pattern is the limit, not the bias's direction",
                       f"{100 * a:+.1f} pp"))
    c = res["bias_cosine"]
    out.append(row("[PT+] E1", "its bias direction moves with the query (mean pairwise cosine over positions, "
                   "defaults' run; a P=1 prefix's is 1)", PAPER, f"{c['mean']:.3f} (heads {c['min']:.3f} … {c['max']:.3f})",
                   c["mean"] < SPREAD_MAX, f"mean cosine < {SPREAD_MAX}", f"mean {c['mean']:.3f}"))
    return out


EXPERIMENT = Experiment(
    name="PT+E1", title="[PT+] E1: Prefix-Tuning+ on descending (ascending base)", run=run, config=toy_config("E1"),
    rows=rows, estimate=lambda cfg: tuning_estimate(cfg, lambda tune, long: 2 * tune), section="prefix_plus",
    base=e1.BASE, recipe="E1")
