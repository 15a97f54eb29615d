"""E1, 'cannot learn a new task' ([P]): an ascending base tuned for descending.

The layout every experiment module shares (its run, its table rows, its report section; why
`run` takes `run_jobs` as an argument): study/runkit.py's docstring.
"""

from __future__ import annotations

from pathlib import Path

from prefixlab_common.progress import Progress
from toy_models.pipeline import evaluate_run
from tuning.pipeline import load_run
from study.rows import _ms, _row, _tokens
from study.runkit import _collect, _ensure_pretrain, _job, _prefix, _prompt_jobs, best_prompts

STAGE = "E1"


def run(out: Path, bases: Path, r: Recipe, progress: Progress | None = None, device=None,
           prompt: dict | None = None, *, run_jobs) -> dict:
    """E1, 'cannot learn a new task': pretrained on ascending, tuned for descending; with `prompt`
    ({"P", "batch_size"}), also the best hard prompt of length <= P ("prompt")."""
    base = _ensure_pretrain(bases, "E1", r, progress, device)
    methods = {
        "full": ("full", {}),
        "lora": ("lora", {"rank": 1}),
        "soft_prompt": ("soft_prompt", {"length": 1}),
        "prefix_none": ("prefix", _prefix(1, r, "none")),
        "prefix_simple": ("prefix", _prefix(1, r, "simple")),
        "prefix_deep": ("prefix", _prefix(1, r, "deep")),
    }
    jobs = [_job(out, name, method, "descending", opts, r, seed)
            for seed in r.seeds for name, (method, opts) in methods.items()]
    hard = [j for seed in r.seeds for j in _prompt_jobs(out, "prompt", "descending", prompt, r, seed)] if prompt else []
    metrics = run_jobs(base, jobs + hard, progress, device)
    acc, runs, curves = _collect(jobs, metrics[:len(jobs)])
    base_acc = evaluate_run(load_run(base), ["ascending", "descending"], r.eval_size)
    res = {"experiment": "E1", "base": str(base), "runs": runs, "curves": curves,
           "base_acc": {t: v["exact_acc"] for t, v in base_acc.items()}, "descending_acc": acc}
    if prompt:
        best = best_prompts(hard, metrics[len(jobs):])["prompt"]
        res["runs"]["prompt"] = best.pop("run")
        res["descending_acc"]["prompt"] = best.pop("acc")
        res["prompt"] = {"P": prompt["P"], **best}
    return res


def prompt_e1_row(e1: dict) -> dict:
    """Hard prompting on E1: [P]'s hierarchy (prompting ⊆ soft prompting ⊆ prefix-tuning) puts a
    hard prompt below every context method, none of which can learn descending; [P] did not run it."""
    a, p = e1["descending_acc"]["prompt"], e1["prompt"]
    return _row("[P] E1", f"a hard prompt (best of length ≤ {p['P']}) cannot learn descending either",
                "(not run in [P]; prompting ⊆ prefix-tuning)",
                f"{_ms(a)} (length {p['length'][0]}, tokens {_tokens(p['tokens'][0])})",
                a["mean"] <= 0.05, "≤ 5 %", f"{100 * a['mean']:+.1f} pp")


def rows(e1: dict) -> list[dict]:
    acc = e1["descending_acc"]
    full = acc["full"]["mean"]
    rows = [_row("[P] E1", "full fine-tuning learns descending (ascending base)", "84.9 %", _ms(acc["full"]),
                 full >= 0.5, "≥ 50 %", f"{100 * (full - 0.849):+.1f} pp")]
    for k, label in (("prefix_simple", "Simple-share prefix"), ("prefix_none", "No-share prefix"),
                     ("prefix_deep", "Deep-share prefix"), ("soft_prompt", "soft prompt")):
        a = acc[k]["mean"]
        rows.append(_row("[P] E1", f"{label} cannot learn descending", "0.0 %" if "prefix" in k else "(not run in [P])",
                         _ms(acc[k]), a <= 0.05, "≤ 5 %", f"{100 * a:+.1f} pp"))
    if "prompt" in acc:
        rows.append(prompt_e1_row(e1))
    return rows


def missing_rows() -> list[dict]:
    """The table's row when E1 failed or did not run."""
    return [_row("[P] E1", "E1", "—", "stage failed or not run", None, "")]
