"""E3's report section: each task's accuracy and the new tasks' curves."""

from __future__ import annotations

from reports.experiments.common import curves_figure
from reports.html import Table
from study.rows import of_ceiling, pct


def section(r: dict, records: dict) -> tuple:
    rows = [[t, pct(v["mean"]), f"{100 * v['std']:.1f}"] for t, v in r["acc"].items()]
    return ("E3: P=10 prefixes on a deeper mix4 model", [
        Table(["task", "exact accuracy", "std (pp)"], rows),
        curves_figure({t: r["curves"][t] for t in r["curves"] if t in ("ascending_add1", "double_hist")},
                      "E3: the new tasks' prefixes (plateau and crossing)")],
        f"Base: {of_ceiling(r['base_acc'])}.")
