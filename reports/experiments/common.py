"""What the experiments' report sections share."""

from __future__ import annotations

from reports.figures import learning_curves_figure
from reports.html import Table
from study.rows import pct


def curves_figure(curves: dict, title: str):
    """Loss and accuracy against the step, from the study's [step, loss, accuracy] rows."""
    return learning_curves_figure({k: [{"step": s, "loss": l, "exact_acc": a} for s, l, a in rows]
                                   for k, rows in curves.items()}, title)


def prompt_table(P: int, per_task: dict, prefix: dict | None = None) -> Table:
    """The best hard prompt of length ≤ P per task (E1: descending; E2: each pretrained task): the
    length and tokens the search chose on its training batch (first seed), its test accuracy, each
    length's accuracy and, in E2, the P=1 prefix on the same task."""
    rows = [[t, p["length"][0], "[" + " ".join(map(str, p["tokens"][0])) + "]", pct(p["acc"]["mean"]),
             ", ".join(f"P={n}: {pct(v['mean'])}" for n, v in p["by_length"].items())]
            + ([pct(prefix[t]["mean"])] if prefix else []) for t, p in per_task.items()]
    return Table(["task", "chosen length", "tokens (first seed)", f"best hard prompt (length ≤ {P})",
                  "each length"] + (["P=1 prefix"] if prefix else []), rows)


def exact(c: dict) -> str:
    """A theorem check's verdict (Theorems 1 and 2)."""
    return "exact" if c.get("all_exact") or c.get("exact") else "not exact"
