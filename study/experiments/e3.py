"""E3, 'new task, same attention' ([P]): P=10 prefixes on a deeper mix4 base, old tasks and new.

Its run, its rows of the paper-vs-lab table and, last, its declaration (`study.experiments.declaration`).
"""

from __future__ import annotations

from pathlib import Path

from prefixlab_common.progress import Progress
from toy_models.tasks import MIX4
from study.experiments.declaration import Experiment
from study.experiments.toy import base_accuracy, collect, ensure_pretrain, job, prefix_options, run_jobs, tuning_estimate
from study.recipes import Recipe
from study.rows import ms, of_ceiling, pct, row

# E3 and E4 share this base where their recipes' bases match (12 slots, so that E4's P=12 prefix
# fits; E3's P=10 prefixes take 10 of them)
BASE = ("mix4", 12)

E3_NEW = ("ascending_add1", "double_hist")  # new tasks: the long runs


def run(out: Path, bases: Path, r: Recipe, cfg: dict, progress: Progress | None = None, device=None) -> dict:
    """E3, 'new task, same attention': deeper mix4 base, P=10 prefixes on the pretraining tasks
    and on two new ones (the new ones train for `long_steps`)."""
    base = ensure_pretrain(bases, BASE, r, progress, device)
    jobs = [job(out, f"prefix-{t}", "prefix", t, prefix_options(10, r), r, seed, long=t in E3_NEW)
            for seed in r.seeds for t in list(MIX4) + list(E3_NEW)]
    acc, runs, curves = collect(jobs, run_jobs(base, jobs, progress, device))
    strip = lambda d: {k.removeprefix("prefix-"): v for k, v in d.items()}
    return {"experiment": "E3", "base": str(base), "runs": strip(runs), "curves": strip(curves),
            "base_acc": base_accuracy(base, r), "acc": strip(acc)}


def rows(e3: dict) -> list[dict]:
    acc = e3["acc"]
    pre = min(acc[t]["mean"] for t in ("ascending", "descending", "add1", "add2"))
    a, h = acc["ascending_add1"]["mean"], acc["double_hist"]["mean"]
    return [row("[P] E3", "P=10 prefixes solve the pretraining tasks (min over 4)", "≈ 100 %",
                 f"{pct(pre)} (base: {of_ceiling(e3['base_acc'])})",
                 pre >= 0.9, "≥ 90 %", f"{100 * (pre - 1):+.1f} pp"),
            row("[P] E3", "prefix partly learns ascending_add1 (new composition)", "71.6 %",
                 ms(acc["ascending_add1"]), 0.1 <= a, "≥ 10 % (partly or fully)", f"{100 * (a - 0.716):+.1f} pp"),
            row("[P] E3", "prefix fails double_hist (new attention pattern)", "0.6 %", ms(acc["double_hist"]),
                 h <= 0.05, "≤ 5 %", f"{100 * (h - 0.006):+.1f} pp")]


def config(scale: str, recipes: dict[str, Recipe]) -> dict:
    return {"preset": scale, "recipe": recipes["E3"].to_dict()}


EXPERIMENT = Experiment(
    name="E3", title="E3: new tasks on a deeper mix4 model", run=run, config=config, rows=rows,
    estimate=lambda cfg: tuning_estimate(cfg, lambda tune, long: 4 * tune + 2 * long), section="e3",
    base=BASE, recipe="E3")
