"""[PT+] E4: Prefix-Tuning+ at the E4 parameter budget on double_hist: the width whose count matches
rank-1 LoRA's (`tuning.pipeline.budget_match`; width 6 gives 12,288 on 4/4/256), trained as E4's LoRA
and prefix (long_steps, long_schedule). The report puts it beside E4's numbers.

Its run, its rows of the paper-vs-lab table and, last, its declaration (`study.experiments.declaration`).
"""

from __future__ import annotations

from pathlib import Path

from prefixlab_common.progress import Progress
from tuning import make_method
from tuning.pipeline import budget_match, load_run
from study.experiments import e4
from study.experiments.declaration import Experiment
from study.experiments.prefix_plus.common import METHOD, PAPER, toy_config, tune
from study.experiments.toy import ensure_pretrain, tuning_estimate
from study.recipes import Recipe
from study.rows import ms, row

CEILING = 0.05  # the prefix's row: ≤ 5 %; [PT+] escapes the limit above it


def run(out: Path, bases: Path, r: Recipe, cfg: dict, progress: Progress | None = None, device=None) -> dict:
    model = load_run(ensure_pretrain(bases, e4.BASE, r, progress, device)).model
    lora_n = make_method("lora", model, rank=1).n_params
    width, _ = budget_match(model, lora_n, METHOD)
    base, acc, runs, curves, params = tune(out, bases, e4.BASE, r, [("plus", "double_hist", {"width": width}, True)],
                                           progress, device)
    return {"experiment": "PT+E4", "base": str(base), "runs": runs, "curves": curves, "width": width,
            "params": {"lora": lora_n, "plus": params["plus"]}, "double_hist_acc": acc}


def rows(res: dict) -> list[dict]:
    a, n = res["double_hist_acc"]["plus"], res["params"]
    return [row("[PT+] E4", f"[PT+] at rank-1 LoRA's budget (width {res['width']}, {n['plus']:,} params; LoRA "
                f"{n['lora']:,}) learns double_hist", PAPER, ms(a), a["mean"] > CEILING,
                f"> {100 * CEILING:.0f} % (above the prefix's ceiling): [PT+] escapes the limit the prefix hits",
                f"{100 * (a['mean'] - CEILING):+.1f} pp")]


EXPERIMENT = Experiment(
    name="PT+E4", title="[PT+] E4: Prefix-Tuning+ at rank-1 LoRA's budget on double_hist", run=run,
    config=toy_config("E4"), rows=rows, estimate=lambda cfg: tuning_estimate(cfg, lambda tune, long: long),
    section="prefix_plus", base=e4.BASE, recipe="E4")
