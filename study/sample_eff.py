"""[L]'s sample-efficiency claim on the toy (docs/papers.md §6): No-, Simple- and Deep-share prefixes
on fixed pools of n training examples.

The layout every experiment module shares (its run, its table rows, its report section; why
`run` takes `run_jobs` as an argument): study/runkit.py's docstring.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prefixlab_common.progress import Progress
from toy_models.tasks import TaskSpec, fixed_test_set, resolve_task, sample_batch
from toy_models.training import evaluate, loss_on
from tuning import make_method
from tuning.pipeline import load_run
from study.rows import _pct, _row
from study.runkit import _ensure_pretrain, _mean_std, _train, base_accuracy, precision_key

STAGE = "sample_eff"

# [L]'s prefix parameterizations (docs/papers.md §1): Deep-share as [L]'s vision code built it (one MLP
# per layer, hidden 48) and as Li & Liang built it (one MLP shared across layers, hidden 512)
SAMPLE_EFF_VARIANTS = {
    "none": {"share": "none"},
    "simple": {"share": "simple"},
    "deep48": {"share": "deep", "mlp": "per_layer", "hidden": 48},
    "deep512": {"share": "deep", "mlp": "shared", "hidden": 512},
}


def _size_name(n: int | None) -> str:
    return "fresh" if n is None else str(n)


def held_out_losses(path: str | Path, val, test) -> dict:
    """A tuned run's teacher-forced loss on the validation and test sets, and its exact accuracy
    on the validation set (the test accuracy is in its metrics)."""
    run = load_run(path)
    run.model.eval()
    with torch.no_grad():
        out = {"val_loss": loss_on(run.model, val, run.state).item(),
               "test_loss": loss_on(run.model, test, run.state).item()}
    out["val_acc"] = evaluate(run.model, run.state, val, greedy=False)["exact_acc"]
    return out


def validation_set(task_name: str, spec: TaskSpec, n: int, seed: int = 4321):
    """Inputs of the *train* split (never the test split) drawn on a stream no training pool uses:
    learning rates are chosen here, never on the test set ([L] grid-searched on a validation split)."""
    return sample_batch(resolve_task(task_name, spec), spec, n, np.random.default_rng([seed, 0x7A1]), split="train")


def run(out: Path, bases: Path, r: Recipe, cfg: dict, progress: Progress | None = None,
                          device=None, *, run_jobs) -> dict:
    """The toy counterpart of [L]'s claim (docs/papers.md §6): No-, Simple- and Deep-share prefixes
    learning a task the base cannot do (E3's ascending_add1 on the E3/E4 base), each on a fixed
    pool of n training examples, n from tens to thousands, plus fresh data (n = None).

    Each variant gets its own learning rate, chosen from its grid by the validation loss at the
    smallest n (first seed), as [L] grid-searched per method; every variant starts at the base
    (init 'slot'). cfg: task, P, variants (names of SAMPLE_EFF_VARIANTS), sizes (null: fresh),
    seeds, steps, lr_grid {variant: [lr, ...]}, val_size."""
    base = _ensure_pretrain(bases, cfg["experiment"], r, progress, device)
    task, P, steps = cfg["task"], cfg["P"], cfg["steps"]
    sizes, seeds = list(cfg["sizes"]), list(cfg["seeds"])
    base_run = load_run(base)
    spec = base_run.spec
    val = validation_set(task, spec, cfg["val_size"])
    test = fixed_test_set(resolve_task(task, spec), spec, r.eval_size)

    def job(v: str, n: int | None, lr: float, seed: int) -> dict:
        train = {**_train(r, "prefix", seed), "steps": steps, "lr": lr, "schedule": "constant", "warmup": 0,
                 "eval_every": max(1, steps // 4), "train_size": n}
        return {"name": f"{v}|{_size_name(n)}|{lr:g}", "method": "prefix", "task": task, "seed": seed,
                "out": out / f"prefix-{v}-{task}-n{_size_name(n)}-lr{lr:g}-s{seed}",
                "opts": {"length": P, "init": "slot", **SAMPLE_EFF_VARIANTS[v]}, "train": train, **precision_key(r)}

    held: dict[Path, dict] = {}  # the selection runs come back in step 2: their held-out losses once

    def measure(jobs: list[dict]) -> list[dict]:
        metrics = run_jobs(base, jobs, progress, device)
        for j in jobs:
            if j["out"] not in held:
                held[j["out"]] = held_out_losses(j["out"], val, test)
        return [{"acc": m["exact_acc"], **held[j["out"]]} for j, m in zip(jobs, metrics)]

    # 1. each variant's learning rate, on the validation split at the smallest n (first seed)
    grid_jobs = [job(v, sizes[0], lr, seeds[0]) for v in cfg["variants"] for lr in cfg["lr_grid"][v]]
    grid: dict[str, dict[str, dict]] = {}
    for j, m in zip(grid_jobs, measure(grid_jobs)):
        v, _, lr = j["name"].split("|")
        grid.setdefault(v, {})[lr] = {"val_loss": m["val_loss"], "val_acc": m["val_acc"]}
    chosen = {v: float(min(g, key=lambda lr: g[lr]["val_loss"])) for v, g in grid.items()}
    # 2. every size and seed at the chosen rate (the selection runs are reused, not retrained);
    # smallest n first, every variant and seed of a size together, so that a study stopped part
    # way keeps whole comparisons at the sizes where the claim lives (runs resume one by one)
    jobs = [job(v, n, chosen[v], seed) for n in sizes for seed in seeds for v in cfg["variants"]]
    by: dict[str, dict[str, dict[str, list[float]]]] = {}
    for j, m in zip(jobs, measure(jobs)):
        v, n, _ = j["name"].split("|")
        cell = by.setdefault(v, {}).setdefault(n, {})
        for k in ("acc", "test_loss", "val_loss"):
            cell.setdefault(k, []).append(m[k])
    stats = {v: {n: {k: _mean_std(xs) for k, xs in cell.items()} for n, cell in per.items()} for v, per in by.items()}
    n_params = {v: make_method("prefix", base_run.model, **{**SAMPLE_EFF_VARIANTS[v], "length": P}).n_params
                for v in cfg["variants"]}
    return {"experiment": "sample_efficiency", "task": task, "P": P, "steps": steps, "base": str(base),
            "base_acc": base_accuracy(base, r), "sizes": [_size_name(n) for n in sizes], "seeds": seeds,
            "variants": {v: SAMPLE_EFF_VARIANTS[v] for v in cfg["variants"]}, "n_params": n_params,
            "lr_grid": grid, "lr": chosen, "val_size": cfg["val_size"], "test_size": len(test),
            "acc": {v: {n: c["acc"] for n, c in per.items()} for v, per in stats.items()},
            "test_loss": {v: {n: c["test_loss"] for n, c in per.items()} for v, per in stats.items()},
            "runs": {f"{v}/{_size_name(n)}": str(job(v, n, chosen[v], seeds[0])["out"])
                     for v in cfg["variants"] for n in sizes}}


SHARED = {"simple": "Simple-share", "deep48": "Deep-share (MLP 48/layer)", "deep512": "Deep-share (MLP 512, shared)"}


def _spread(d: dict) -> float:
    """The seed spread of one cell: max − min over its seeds."""
    return max(d["values"]) - min(d["values"])


def _sharing_ahead(se: dict, metric: dict, lo: str, hi: str, shared: list[str], higher_is_better: bool):
    """The toy's contrast on one metric: the best shared variant at the smallest n against
    No-share, its gap against the seed spread, and the gap at the largest n. Gaps are signed so
    that positive means sharing is ahead: percentage points for accuracy, nats for loss."""
    sign = 1.0 if higher_is_better else -1.0
    label = lambda v: SHARED.get(v, "No-share")
    if higher_is_better:
        fmt, fmt_abs = (lambda x: f"{100 * x:+.1f} pp"), (lambda x: f"{100 * x:.1f} pp")
    else:
        fmt, fmt_abs = (lambda x: f"{x:+.3f} nats"), (lambda x: f"{x:.3f} nats")
    best = max(shared, key=lambda v: sign * metric[v][lo]["mean"])
    gap_small = sign * (metric[best][lo]["mean"] - metric["none"][lo]["mean"]) + 0.0  # + 0.0: no "-0.000"
    gap_large = max(sign * metric[v][hi]["mean"] for v in shared) - sign * metric["none"][hi]["mean"] + 0.0
    spread = max(_spread(metric[best][lo]), _spread(metric["none"][lo]))
    if len(se["seeds"]) < 2:
        holds, why = False, "one seed: no seed spread to compare the gap with"
    elif gap_small <= spread:
        holds, why = False, (f"at n={lo} the best shared variant ({label(best)}) is {fmt(gap_small)} from "
                             f"No-share, within or below the seed spread {fmt_abs(spread)}")
    elif gap_large >= gap_small:
        holds, why = False, (f"shared ahead by {fmt_abs(gap_small)} at n={lo} but not less at n={hi} "
                             f"({fmt(gap_large)}): not a sample-size effect")
    else:
        holds, why = True, None
    return best, gap_small, gap_large, spread, holds, why

def rows(se: dict) -> list[dict]:
    """[L]'s claim on the toy: a shared parameterization ahead of No-share at the smallest n by
    more than the seed spread, and the gap shrinking at the largest finite n. Needs both sides
    (No-share and a shared variant) and at least two seeds; plus whether Deep-share trains."""
    acc, loss = se["acc"], se["test_loss"]
    finite = [n for n in se["sizes"] if n != "fresh"]
    lo, hi = finite[0], finite[-1]
    shared = [v for v in SHARED if v in acc]
    label = lambda v: SHARED.get(v, "No-share")
    lab = "; ".join(f"{label(v)} " + " / ".join(f"{_pct(acc[v][n]['mean'])}" for n in se["sizes"])
                    for v in ["none", *shared] if v in acc)
    lab += f" (n = {' / '.join(se['sizes'])}, {len(se['seeds'])} seeds; lr {', '.join(f'{v} {lr:g}' for v, lr in se['lr'].items())})"
    claim = (f"sharing is more sample-efficient ({se['task']}, P={se['P']} prefixes, "
             f"{se['steps']:,} steps, n = {lo} … {hi})")
    paper = "Simple 89.1 / Deep 88.3 > No-share 82.3 (FGVC)"
    beyond = (" at the smallest n by more than the seed spread (max − min over ≥ 2 seeds), "
              "gap smaller at the largest n")
    crit = "best shared variant ahead of No-share" + beyond
    if "none" not in acc or not shared:
        return [_row("[L] toy", claim, paper, lab, False, crit, "one side of the contrast is missing")]
    best, gap_small, gap_large, spread, holds, why = _sharing_ahead(se, acc, lo, hi, shared, higher_is_better=True)
    dloss = loss["none"][lo]["mean"] - loss[best][lo]["mean"]
    rows = [_row("[L] toy", claim, paper,
                 lab + f"; gap {100 * gap_small:+.1f} pp at n={lo} (spread {100 * spread:.1f} pp), "
                 f"{100 * gap_large:+.1f} pp at n={hi}; test loss No-share − {label(best)} at n={lo}: {dloss:+.3f}",
                 holds, crit, why)]
    # the same contrast in teacher-forced test loss (both metrics are reported; [L]'s language
    # rows and the language analogue read loss): lower is better, gaps in nats
    if all(lo in loss.get(v, {}) and hi in loss.get(v, {}) for v in ["none", *shared]):
        _, g_small, g_large, spr, holds_l, why_l = _sharing_ahead(se, loss, lo, hi, shared, higher_is_better=False)
        lab_l = "; ".join(f"{label(v)} " + " / ".join(f"{loss[v][n]['mean']:.3f}" for n in se["sizes"] if n in loss[v])
                          for v in ["none", *shared])
        rows.append(_row("[L] toy", f"sharing is more sample-efficient in test loss (same runs, n = {lo} … {hi})",
                         "(loss not reported for FGVC)",
                         lab_l + f"; gap {g_small:+.3f} nats at n={lo} (spread {spr:.3f}), {g_large:+.3f} at n={hi}",
                         holds_l, "best shared variant's test loss below No-share's" + beyond, why_l))
    deep = [v for v in ("deep48", "deep512") if v in acc]
    if deep and "simple" in acc:
        d = max(deep, key=lambda v: acc[v][hi]["mean"])
        diff = acc[d][hi]["mean"] - acc["simple"][hi]["mean"]
        rows.append(_row("[L] toy", f"Deep-share trains (its MLP at its own lr {se['lr'][d]:g}; n={hi})",
                         "Deep 88.3 ≈ Simple 89.1 (FGVC)",
                         f"{label(d)} {_pct(acc[d][hi]['mean'])} vs Simple-share {_pct(acc['simple'][hi]['mean'])}",
                         diff >= -0.05 and acc[d][hi]["mean"] >= 0.1,
                         "≥ 10 % and within 5 pp of Simple-share (or above) at the largest n",
                         f"{100 * diff:+.1f} pp"))
    return rows
