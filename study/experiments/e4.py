"""E4 ([P]): a prefix against rank-1 LoRA at an equal parameter budget, on double_hist.

Its run, its rows of the paper-vs-lab table and, last, its declaration (`study.experiments.declaration`).
"""

from __future__ import annotations

from pathlib import Path

from prefixlab_common.progress import Progress
from tuning import make_method
from tuning.pipeline import budget_match, load_run
from study.experiments.declaration import Experiment
from study.experiments.toy import collect, ensure_pretrain, job, prefix_options, run_jobs, tuning_estimate
from study.recipes import Recipe
from study.rows import ms, row

BASE = ("mix4", 12)  # E3's kind of base: one base stage for both where their recipes' bases match (paper)


def run(out: Path, bases: Path, r: Recipe, cfg: dict, progress: Progress | None = None, device=None) -> dict:
    """E4, prefix vs LoRA at equal budget on double_hist: rank-1 LoRA vs a prefix of equal size,
    both trained for `long_steps`."""
    base = ensure_pretrain(bases, BASE, r, progress, device)
    model = load_run(base).model
    lora_n = make_method("lora", model, rank=1).n_params
    P, prefix_n = budget_match(model, lora_n, "prefix", share="simple")
    jobs = [job(out, name, method, "double_hist", opts, r, seed, long=True) for seed in r.seeds
            for name, method, opts in (("lora", "lora", {"rank": 1}), ("prefix", "prefix", prefix_options(P, r)))]
    acc, runs, curves = collect(jobs, run_jobs(base, jobs, progress, device))
    return {"experiment": "E4", "base": str(base), "runs": runs, "curves": curves, "prefix_len": P,
            "params": {"lora": lora_n, "prefix": prefix_n}, "double_hist_acc": acc}


def rows(e4: dict) -> list[dict]:
    acc = e4["double_hist_acc"]
    lo, pr = acc["lora"]["mean"], acc["prefix"]["mean"]
    n = e4["params"]
    return [row("[P] E4", f"rank-1 LoRA learns double_hist ({n['lora']:,} params)", "92.4 % (12,288 params)",
                 ms(acc["lora"]), lo >= 0.5, "≥ 50 %", f"{100 * (lo - 0.924):+.1f} pp"),
            row("[P] E4", f"P={e4['prefix_len']} prefix does not ({n['prefix']:,} params)", "0.3 %",
                 ms(acc["prefix"]), pr <= 0.05 and lo >= 0.5, "≤ 5 %, with LoRA ≥ 50 % in the same study",
                 f"{100 * (pr - 0.003):+.1f} pp" if pr > 0.05 else "LoRA did not learn it either: no contrast")]


def config(scale: str, recipes: dict[str, Recipe]) -> dict:
    return {"preset": scale, "recipe": recipes["E4"].to_dict()}


EXPERIMENT = Experiment(
    name="E4", title="E4: prefix vs rank-1 LoRA at equal budget on double_hist", run=run, config=config, rows=rows,
    estimate=lambda cfg: tuning_estimate(cfg, lambda tune, long: 2 * long), section="e4", base=BASE, recipe="E4")
