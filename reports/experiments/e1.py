"""E1's report section: each method's accuracy on descending, and the best hard prompt."""

from __future__ import annotations

from reports.experiments.common import prompt_table
from reports.html import Table
from study.rows import pct


def section(r: dict, records: dict) -> tuple:
    rows = [[k, pct(v["mean"]), f"{100 * v['std']:.1f}", len(v["values"])] for k, v in r["descending_acc"].items()]
    items = [Table(["method", "exact accuracy on descending", "std (pp)", "seeds"], rows),
             f"Base model: ascending {pct(r['base_acc']['ascending'])}, descending {pct(r['base_acc']['descending'])}."]
    if "prompt" in r:
        items.append(prompt_table(r["prompt"]["P"], {"descending": {**r["prompt"], "acc": r["descending_acc"]["prompt"]}}))
    return ("E1: ascending base, tuned for descending", items)
