"""How a row of the paper-vs-lab table is written (`study.table`): its verdict and its numbers.
Shared by the experiments' rows (`study.experiments`) and their report sections (`reports.experiments`)."""

from __future__ import annotations

def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def ms(d: dict | None) -> str:
    if not d:
        return "—"
    if len(d.get("values", [])) > 1:
        return f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f} %"
    return pct(d["mean"])


NOT_JUDGED = "not judged"  # `holds` of a row that ran but whose design cannot decide its criterion


def row(source, claim, paper, ours, holds, criterion, gap=None):
    if holds == NOT_JUDGED:
        verdict = "no verdict" + (f" ({gap})" if gap else "")
    elif holds is None:
        verdict = "not run"
    elif holds:
        verdict = "reproduced"
    else:
        verdict = "differs" + (f" ({gap})" if gap else "")
    return {"source": source, "claim": claim, "paper": paper, "lab": ours, "verdict": verdict,
            "criterion": criterion}


def of_ceiling(b: dict) -> str:
    """A base's accuracy against its task's ceiling, e.g. '93.1 % of a 94.0 % ceiling (y1 given)'."""
    return (f"{b['task']} {pct(b['exact_acc'])} of a {pct(b['ceiling'])} ceiling"
            + (" (y1 given)" if b.get("y1_given") else ""))


def tokens(t: list[int]) -> str:
    return "[" + " ".join(str(x) for x in t) + "]"
