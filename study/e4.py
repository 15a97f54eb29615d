"""E4 ([P]): a prefix against rank-1 LoRA at an equal parameter budget, on double_hist.

The layout every experiment module shares (its run, its table rows, its report section; why
`run` takes `run_jobs` as an argument): study/runkit.py's docstring.
"""

from __future__ import annotations

from pathlib import Path

from prefixlab_common.progress import Progress
from tuning import make_method
from tuning.pipeline import budget_match, load_run
from study.rows import _ms, _row
from study.runkit import _collect, _ensure_pretrain, _job, _prefix

STAGE = "E4"


def run(out: Path, bases: Path, r: Recipe, progress: Progress | None = None, device=None, *, run_jobs) -> dict:
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


def rows(e4: dict) -> list[dict]:
    acc = e4["double_hist_acc"]
    lo, pr = acc["lora"]["mean"], acc["prefix"]["mean"]
    n = e4["params"]
    return [_row("[P] E4", f"rank-1 LoRA learns double_hist ({n['lora']:,} params)", "92.4 % (12,288 params)",
                 _ms(acc["lora"]), lo >= 0.5, "≥ 50 %", f"{100 * (lo - 0.924):+.1f} pp"),
            _row("[P] E4", f"P={e4['prefix_len']} prefix does not ({n['prefix']:,} params)", "0.3 %",
                 _ms(acc["prefix"]), pr <= 0.05 and lo >= 0.5, "≤ 5 %, with LoRA ≥ 50 % in the same study",
                 f"{100 * (pr - 0.003):+.1f} pp" if pr > 0.05 else "LoRA did not learn it either: no contrast")]
