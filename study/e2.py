"""E2, 'can extract a pretrained task' ([P]): one P=1 prefix per task of a mix4 base.

The layout every experiment module shares (its run, its table rows, its report section; why
`run` takes `run_jobs` as an argument): study/runkit.py's docstring.
"""

from __future__ import annotations

from pathlib import Path

from prefixlab_common.progress import Progress
from toy_models.pipeline import evaluate_run
from toy_models.tasks import MIX4
from tuning.pipeline import load_run
from study.rows import _ms, _pct, _row, _tokens, of_ceiling
from study.runkit import _collect, _ensure_pretrain, _job, _prefix, _prompt_jobs, base_accuracy, best_prompts

STAGE = "E2"


def run(out: Path, bases: Path, r: Recipe, progress: Progress | None = None, device=None,
           prompt: dict | None = None, *, run_jobs) -> dict:
    """E2, 'can extract a pretrained task': mix4 base, one P=1 prefix per task, each evaluated on
    every task (the cross-task matrix, first seed); with `prompt` ({"P", "batch_size"}), also the
    best hard prompt of length <= P for each task: can a hard token select a task as a virtual one does?"""
    base = _ensure_pretrain(bases, "E2", r, progress, device)
    jobs = [_job(out, f"prefix-{t}", "prefix", t, _prefix(1, r), r, seed) for seed in r.seeds for t in MIX4]
    hard = [j for seed in r.seeds for t in MIX4 for j in _prompt_jobs(out, f"prompt-{t}", t, prompt, r, seed)] if prompt else []
    metrics = run_jobs(base, jobs + hard, progress, device)
    acc, runs, curves = _collect(jobs, metrics[:len(jobs)])
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
    lab = (", ".join(f"{t} {_ms(v)} {_tokens(p['tokens'][t][0])}" for t, v in hard.items())
           + "; P=1 prefix " + ", ".join(f"{t} {_ms(own[t])}" for t in hard))
    return _row("[P] E2", f"a hard prompt (best of length ≤ {p['P']}) selects a pretrained task at most as well as "
                "the P=1 prefix", "not reported in [P] (the lab's measurement); prompting ⊆ prefix-tuning", lab,
                all(hard[t]["mean"] <= own[t]["mean"] + PROMPT_TOLERANCE for t in hard),
                f"hard ≤ prefix + {100 * PROMPT_TOLERANCE:.0f} pp on every task",
                f"{worst}: hard − prefix {100 * over[worst]:+.1f} pp")


def rows(e2: dict) -> list[dict]:
    own = e2["own_task_acc"]
    low = min(v["mean"] for v in own.values())
    rows = [_row("[P] E2", "each task's P=1 prefix solves its own pretrained task (min over 4)", "≥ 83.7 %",
                 ", ".join(f"{t} {_ms(v)}" for t, v in own.items()) + f" (base: {of_ceiling(e2['base_acc'])})",
                 low >= 0.75, "min ≥ 75 %",
                 f"min {100 * (low - 0.837):+.1f} pp")]
    off = max(v for t, row in e2["cross_task"].items() for u, v in row.items() if u != t)
    rows.append(_row("[P] E2", "… and ≈ 0 on the other tasks (max off-diagonal)", "≈ 0 %", _pct(off),
                     off <= 0.05, "≤ 5 %", f"{100 * off:+.1f} pp"))
    if "prompt" in e2:
        rows.append(prompt_e2_row(e2))
    return rows
