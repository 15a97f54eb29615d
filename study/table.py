"""The paper-vs-lab table: each headline number of docs/papers.md §3–§6 against this lab's measurement,
with a verdict on whether the paper's *conclusion* holds under a criterion stated in the row, and
the gap where it does not.

Each experiment's rows are its own (`rows` in its declaration, `study.experiments.registry`), in
the registry's order; how a row is written is in `study.rows`."""

from __future__ import annotations

from study.experiments.registry import REGISTRY
from study.rows import row

# The line above the table (stdout and report) at a scale whose verdicts are not evidence
SCALE_BANNERS = {
    "micro": ("NOT EVIDENCE: at micro scale the models are too small and trained too briefly to learn the "
              "tasks, so these verdicts only show that the pipeline runs (results: --scale quick or paper)"),
}


def scale_banner(scale: str) -> str | None:
    """The one-line warning that goes above a `scale` table, or None where its verdicts count."""
    return SCALE_BANNERS.get(scale)


def paper_vs_lab(records: dict) -> list[dict]:
    rows = []
    for e in REGISTRY:
        rec = records.get(e.name, {})
        if rec.get("status") == "done" and rec.get("result"):
            rows += e.rows(rec["result"])
        else:
            rows += e.missing_rows(records)
    rows.append(row("[L] FGVC", "No-share 82.3 < Deep-share 88.3 < Simple-share 89.1 (ViT-B/16, 5 data sets)",
                    "82.3 / 88.3 / 89.1",
                    "cannot run offline: no pretrained ViT-B/16 and none of CUB, NABirds, Flowers, Dogs, Cars "
                    "is on the package registries; the '[L] toy' and '[L] language' rows stand in for it",
                    None, ""))
    return rows
