"""[PT+] E3: Prefix-Tuning+ (defaults) on E3's deeper mix4 base: the pretraining tasks and the new
composition ascending_add1, all at tune_steps. The prefix needs E3's long run (long_steps,
long_schedule) for its partial score; [PT+] is judged on 1/16 of those steps, a handicap that can
only make its row harder to pass (docs/experiments.md, "PT+E3 at 500 steps").

Its run, its rows of the paper-vs-lab table and, last, its declaration (`study.experiments.declaration`).
"""

from __future__ import annotations

from pathlib import Path

from prefixlab_common.progress import Progress
from toy_models.tasks import MIX4
from study.experiments import e3
from study.experiments.declaration import Experiment
from study.experiments.prefix_plus.common import PAPER, toy_config, tune
from study.experiments.toy import base_accuracy, tuning_estimate
from study.recipes import Recipe
from study.rows import ms, of_ceiling, pct, row

NEW = "ascending_add1"


def run(out: Path, bases: Path, r: Recipe, cfg: dict, progress: Progress | None = None, device=None) -> dict:
    named = [(t, t, {}, False) for t in list(MIX4) + [NEW]]
    base, acc, runs, curves, params = tune(out, bases, e3.BASE, r, named, progress, device)
    return {"experiment": "PT+E3", "base": str(base), "runs": runs, "curves": curves, "params": params[NEW],
            "base_acc": base_accuracy(base, r), "acc": acc, "steps": r.steps_for(False),
            "prefix_steps": r.steps_for(True)}


def rows(res: dict) -> list[dict]:
    acc = res["acc"]
    pre = min(acc[t]["mean"] for t in MIX4)
    a = acc[NEW]["mean"]
    # older records trained it as the prefix's long run and name no steps
    steps = f" in {res['steps']:,} steps (the prefix's row: {res['prefix_steps']:,})" if "steps" in res else ""
    return [row("[PT+] E3", f"[PT+] ({res['params']:,} params) solves the pretraining tasks (min over 4)", PAPER,
                f"{pct(pre)} (base: {of_ceiling(res['base_acc'])})", pre >= 0.9, "≥ 90 % (as the P=10 prefixes' row)",
                f"{100 * (pre - 0.9):+.1f} pp"),
            row("[PT+] E3", "[PT+] partly learns ascending_add1 (new composition)" + steps, PAPER, ms(acc[NEW]), a >= 0.1,
                "≥ 10 % (partly or fully, as the prefix's row)", f"{100 * (a - 0.1):+.1f} pp")]


EXPERIMENT = Experiment(
    name="PT+E3", title="[PT+] E3: Prefix-Tuning+ on the deeper mix4 model, old tasks and new", run=run,
    # "new_task_steps" in the key: a stage cached when ascending_add1 trained as the long run is not reused
    config=lambda scale, recipes: {**toy_config("E3")(scale, recipes), "new_task_steps": "tune_steps"}, rows=rows, estimate=lambda cfg: tuning_estimate(cfg, lambda tune, long: 5 * tune),
    section="prefix_plus", base=e3.BASE, recipe="E3")
