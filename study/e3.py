"""E3, 'new task, same attention' ([P]): P=10 prefixes on a deeper mix4 base, old tasks and new.

The layout every experiment module shares (its run, its table rows, its report section; why
`run` takes `run_jobs` as an argument): study/runkit.py's docstring.
"""

from __future__ import annotations

from pathlib import Path

from prefixlab_common.progress import Progress
from toy_models.tasks import MIX4
from study.rows import _ms, _pct, _row, of_ceiling
from study.runkit import _collect, _ensure_pretrain, _job, _prefix, base_accuracy

STAGE = "E3"

E3_NEW = ("ascending_add1", "double_hist")  # new tasks: the long runs


def run(out: Path, bases: Path, r: Recipe, progress: Progress | None = None, device=None, *, run_jobs) -> dict:
    """E3, 'new task, same attention': deeper mix4 base, P=10 prefixes on the pretraining tasks
    and on two new ones (the new ones train for `long_steps`)."""
    base = _ensure_pretrain(bases, "E3", r, progress, device)
    jobs = [_job(out, f"prefix-{t}", "prefix", t, _prefix(10, r), r, seed, long=t in E3_NEW)
            for seed in r.seeds for t in list(MIX4) + list(E3_NEW)]
    acc, runs, curves = _collect(jobs, run_jobs(base, jobs, progress, device))
    strip = lambda d: {k.removeprefix("prefix-"): v for k, v in d.items()}
    return {"experiment": "E3", "base": str(base), "runs": strip(runs), "curves": strip(curves),
            "base_acc": base_accuracy(base, r), "acc": strip(acc)}


def rows(e3: dict) -> list[dict]:
    acc = e3["acc"]
    pre = min(acc[t]["mean"] for t in ("ascending", "descending", "add1", "add2"))
    a, h = acc["ascending_add1"]["mean"], acc["double_hist"]["mean"]
    return [_row("[P] E3", "P=10 prefixes solve the pretraining tasks (min over 4)", "≈ 100 %",
                 f"{_pct(pre)} (base: {of_ceiling(e3['base_acc'])})",
                 pre >= 0.9, "≥ 90 %", f"{100 * (pre - 1):+.1f} pp"),
            _row("[P] E3", "prefix partly learns ascending_add1 (new composition)", "71.6 %",
                 _ms(acc["ascending_add1"]), 0.1 <= a, "≥ 10 % (partly or fully)", f"{100 * (a - 0.716):+.1f} pp"),
            _row("[P] E3", "prefix fails double_hist (new attention pattern)", "0.6 %", _ms(acc["double_hist"]),
                 h <= 0.05, "≤ 5 %", f"{100 * (h - 0.006):+.1f} pp")]
