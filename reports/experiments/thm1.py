"""Theorem 1's report section: every target generated from one virtual token, and the smallest β."""

from __future__ import annotations

from reports.experiments.common import exact
from reports.html import Table
from reports.theory_figures import beta_figure, text_figure


def section(r: dict, records: dict) -> tuple:
    rows = [[f"{c['n_targets']:,} random Y ∈ [V]^N", c["V"], c["N"], f"{c['beta']:g}",
             "—" if c.get("min_beta") is None else f"{c['min_beta']:.2f}",
             "—" if c.get("predicted_min_beta_worst_case") is None else f"{c['predicted_min_beta_worst_case']:.2f}",
             f"{c['n_success']:,} / {c['n_targets']:,}", exact(c)] for c in r["checks"]]
    t = r["text"]
    rows.append([f"the text {t['text']!r}", t["V"], t["N"], f"{t['beta']:g}", "—", "—",
                 "1 / 1" if t["exact"] else "0 / 1", exact(t)])
    return ("Theorem 1: any sequence from one virtual token", [
        Table(["target", "V", "N", "β", "smallest β that works", "worst-case β", "generated exactly", "verdict"], rows),
        beta_figure(r["checks"]), text_figure(t["text"], t["generated"])],
        "docs/papers.md §5: one attention layer (two heads) and a three-layer MLP generate any Y ∈ [V]^N "
        "from a single virtual token; a hard token selects at most V continuations.")
