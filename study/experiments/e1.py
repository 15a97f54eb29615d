"""E1, 'cannot learn a new task' ([P]): an ascending base tuned for descending.

Its run, its rows of the paper-vs-lab table and, last, its declaration (`study.experiments.declaration`).
"""

from __future__ import annotations

from pathlib import Path

from prefixlab_common.progress import Progress
from toy_models.pretraining import evaluate_run
from tuning.pipeline import load_run
from study.experiments.declaration import Experiment
from study.experiments.toy import (best_prompts, collect, ensure_pretrain, job, prefix_options, prompt_jobs, run_jobs,
                                   tuning_estimate)
from study.recipes import PROMPTING, Recipe
from study.rows import ms, row, tokens

BASE = ("ascending", 1)


def run(out: Path, bases: Path, r: Recipe, cfg: dict, progress: Progress | None = None, device=None) -> dict:
    """E1, 'cannot learn a new task': pretrained on ascending, tuned for descending; with
    cfg["prompt"] ({"P", "batch_size"}), also the best hard prompt of length <= P ("prompt")."""
    prompt = cfg.get("prompt")
    base = ensure_pretrain(bases, BASE, r, progress, device)
    methods = {
        "full": ("full", {}),
        "lora": ("lora", {"rank": 1}),
        "soft_prompt": ("soft_prompt", {"length": 1}),
        "prefix_none": ("prefix", prefix_options(1, r, "none")),
        "prefix_simple": ("prefix", prefix_options(1, r, "simple")),
        "prefix_deep": ("prefix", prefix_options(1, r, "deep")),
    }
    jobs = [job(out, name, method, "descending", opts, r, seed)
            for seed in r.seeds for name, (method, opts) in methods.items()]
    hard = [j for seed in r.seeds for j in prompt_jobs(out, "prompt", "descending", prompt, r, seed)] if prompt else []
    metrics = run_jobs(base, jobs + hard, progress, device)
    acc, runs, curves = collect(jobs, metrics[:len(jobs)])
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
    return row("[P] E1", f"a hard prompt (best of length ≤ {p['P']}) cannot learn descending either",
                "(not run in [P]; prompting ⊆ prefix-tuning)",
                f"{ms(a)} (length {p['length'][0]}, tokens {tokens(p['tokens'][0])})",
                a["mean"] <= 0.05, "≤ 5 %", f"{100 * a['mean']:+.1f} pp")


def rows(e1: dict) -> list[dict]:
    acc = e1["descending_acc"]
    full = acc["full"]["mean"]
    rows = [row("[P] E1", "full fine-tuning learns descending (ascending base)", "84.9 %", ms(acc["full"]),
                 full >= 0.5, "≥ 50 %", f"{100 * (full - 0.849):+.1f} pp")]
    for k, label in (("prefix_simple", "Simple-share prefix"), ("prefix_none", "No-share prefix"),
                     ("prefix_deep", "Deep-share prefix"), ("soft_prompt", "soft prompt")):
        a = acc[k]["mean"]
        rows.append(row("[P] E1", f"{label} cannot learn descending", "0.0 %" if "prefix" in k else "(not run in [P])",
                         ms(acc[k]), a <= 0.05, "≤ 5 %", f"{100 * a:+.1f} pp"))
    if "prompt" in acc:
        rows.append(prompt_e1_row(e1))
    return rows


def missing_rows() -> list[dict]:
    """The table's row when E1 failed or did not run."""
    return [row("[P] E1", "E1", "—", "stage failed or not run", None, "")]


def config(scale: str, recipes: dict[str, Recipe]) -> dict:
    return {"preset": scale, "recipe": recipes["E1"].to_dict(), "prompt": PROMPTING[scale]}


EXPERIMENT = Experiment(
    name="E1", title="E1: pretrained on ascending, tuned for descending", run=run, config=config, rows=rows,
    estimate=lambda cfg: tuning_estimate(cfg, lambda tune, long: 6 * tune), section="e1", base=BASE, recipe="E1",
    missing_rows=lambda records: missing_rows())
