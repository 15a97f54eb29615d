"""[PT+] E2: Prefix-Tuning+ (defaults) on each pretraining task of E2's mix4 base, at E2's tune_steps.

Its run, its rows of the paper-vs-lab table and, last, its declaration (`study.experiments.declaration`).
"""

from __future__ import annotations

from pathlib import Path

from prefixlab_common.progress import Progress
from toy_models.tasks import MIX4
from study.experiments import e2
from study.experiments.declaration import Experiment
from study.experiments.prefix_plus.common import PAPER, toy_config, tune
from study.experiments.toy import base_accuracy, tuning_estimate
from study.recipes import Recipe
from study.rows import ms, of_ceiling, row


def run(out: Path, bases: Path, r: Recipe, cfg: dict, progress: Progress | None = None, device=None) -> dict:
    base, acc, runs, curves, params = tune(out, bases, e2.BASE, r, [(t, t, {}, False) for t in MIX4], progress, device)
    return {"experiment": "PT+E2", "base": str(base), "runs": runs, "curves": curves, "params": params[MIX4[0]],
            "base_acc": base_accuracy(base, r), "own_task_acc": acc}


def rows(res: dict) -> list[dict]:
    own = res["own_task_acc"]
    low = min(v["mean"] for v in own.values())
    return [row("[PT+] E2", f"[PT+] ({res['params']:,} params) solves each pretrained task of mix4 (min over 4)", PAPER,
                ", ".join(f"{t} {ms(v)}" for t, v in own.items()) + f" (base: {of_ceiling(res['base_acc'])})",
                low >= 0.75, "min ≥ 75 % (as the P=1 prefixes' row)", f"min {100 * (low - 0.75):+.1f} pp")]


EXPERIMENT = Experiment(
    name="PT+E2", title="[PT+] E2: Prefix-Tuning+ on mix4's pretrained tasks", run=run, config=toy_config("E2"),
    rows=rows, estimate=lambda cfg: tuning_estimate(cfg, lambda tune, long: 4 * tune), section="prefix_plus",
    base=e2.BASE, recipe="E2")
