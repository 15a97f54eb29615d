"""The report of `prefixlab reproduce`: the paper-vs-lab table first, then each stage's evidence.

The E1 runs (base, full fine-tuning, prefixes, soft prompt) go through `build_report`, which
gives the Figure-1 heatmaps, invariance and bias sections, accuracy and provenance; everything
else is added as extra sections: the table, the stages, the bases, then each experiment's section
in the registry's order (`study.experiments.registry`; the sections are `reports.experiments.<section>`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from reports.build import build_report
from reports.experiments.common import curves_figure
from reports.html import Table, render_report, write_report
from study.experiments.declaration import Experiment
from study.experiments.registry import REGISTRY
from study.recipes import recipe_precision
from study.rows import pct
from study.table import scale_banner


def _table_section(table: list[dict], scale: str) -> tuple:
    rows = [[r["source"], r["claim"], r["paper"], r["lab"], r["verdict"], r["criterion"]] for r in table]
    intro = (f"Every headline number of docs/papers.md §3–§6 against this lab's measurement (scale '{scale}'). "
             "'reproduced' means the paper's conclusion holds under the stated criterion; 'differs' "
             "gives the measured gap. Differences are results, not failures.")
    banner = scale_banner(scale)
    intro = f"{banner}. {intro}" if banner else intro
    return ("Paper vs lab", [Table(["source", "claim", "paper", "lab", "verdict", "criterion"], rows)], intro)


def _stages_section(records: dict, timing: dict | None = None) -> tuple:
    def times(r: dict) -> list:
        t = r.get("timing") or {}
        if r.get("cached"):  # what it took when it was computed, if that was recorded
            return [f"cached ({t['work_s']:.0f} s when computed)" if "work_s" in t else "cached", "", "", ""]
        return [f"{t.get('work_s', r.get('seconds', 0)):.0f} s", f"{t.get('wall_s', r.get('seconds', 0)):.0f} s",
                f"{t['waited_s']:.0f} s" if "waited_s" in t else "—", t.get("threads", "—")]
    def precision(r: dict) -> str:  # a training stage's, as its config (so its key) holds it
        recipe = (r.get("config") or {}).get("recipe")
        return recipe_precision(recipe) if isinstance(recipe, dict) else "—"
    rows = [[n, r.get("title", n), r["status"] + (" (cached)" if r.get("cached") else "")] + times(r)
            + [precision(r), r.get("error", "")] for n, r in records.items()]
    intro = ("Each stage is cached by a hash of its config; a failed stage is listed here and the others still ran. "
             "Work: the seconds a stage computed (its groups of runs counted once each); wall: from its start to its "
             "end, which in a parallel study includes the time its groups waited for a core (waited). Precision: "
             "what a training stage trained in (a study that names none, on a CPU with native bf16, uses bf16 only "
             "where it was measured faster).")
    if timing and not timing.get("stages_run"):
        intro += (" Every stage of this run was cached, so it computed nothing and its wall time says nothing of the "
                  "study's speed; the table gives each stage's work from when it was computed.")
    elif timing:
        chain = " → ".join(timing.get("longest_chain") or []) or "—"
        intro += (f" This study: {timing['wall_s']:.0f} s of wall time on {timing['cores']} worker(s), against "
                  f"{timing['work_s']:.0f} s of stage work ({timing['work_s'] / max(1, timing['cores']):.0f} s per worker) "
                  f"and a longest chain of {timing['longest_chain_s']:.0f} s ({chain}): perfect packing would take "
                  f"{timing['bound_s']:.0f} s ({100 * (timing['of_bound'] or 0):.0f} % of the wall time).")
    return ("Stages", [Table(["stage", "what", "status", "work", "wall", "waited", "threads", "precision", "error"], rows)], intro)


def _bases_section(records: dict) -> tuple | None:
    bases = {n: r["result"] for n, r in records.items() if n.startswith("base-") and r.get("status") == "done"}
    if not bases:
        return None
    rows = [[n, b["task"], pct(b["exact_acc"]), pct(b["ceiling"]) + (" (y1 given)" if b.get("y1_given") else ""),
             f"{100 * b['of_ceiling']:.1f} %", "met" if b["of_ceiling"] >= 0.99 else "below", b["steps"]]
            for n, b in bases.items()]
    return ("Base models against their ceilings", [
        Table(["base", "task", "exact accuracy", "ceiling", "share of the ceiling", "target ≥ 99 %", "steps"], rows),
        curves_figure({n: b["curve"] for n, b in bases.items()}, "Pretraining curves")],
        "A perfect predictor of mix4 with y1 given scores 94.0 % on the fixed test set: y1 does not always "
        "tell descending from add1/add2 (docs/papers.md §3b). Accuracies are reported against that ceiling.")








def section(experiment: Experiment) -> Callable[[dict, dict], tuple]:
    """An experiment's report section: `section` of the module its declaration names."""
    return importlib.import_module(f"reports.experiments.{experiment.section}").section


def _experiments_sections(records: dict) -> list:
    """Each finished stage's evidence section, in the registry's order (the bases first)."""
    bases = _bases_section(records)
    out = [bases] if bases else []
    for e in REGISTRY:
        if e.section and records.get(e.name, {}).get("status") == "done":
            out.append(section(e)(records[e.name]["result"], records))
    return out








def render_study(out: Path, study: dict) -> Path:
    """out/report.html from what `study.reproduce.reproduce` returned (it renders, computes nothing)."""
    report = Path(out) / "report.html"
    write_study_report(report, study["preset"], study["table"], study["records"], study.get("timing"))
    return report


def write_study_report(out: Path, scale: str, table: list[dict], records: dict, timing: dict | None = None) -> None:
    extras = [_table_section(table, scale), _stages_section(records, timing)] + _experiments_sections(records)
    rec = records.get("E1", {})
    if rec.get("status") == "done":
        r = rec["result"]
        runs = [r["base"]] + [r["runs"][k] for k in ("full", "prefix_simple", "soft_prompt", "lora") if k in r["runs"]]
        build_report([Path(p) for p in runs], out, n_inputs=100, extra_sections=extras,
                     title=f"prefixlab reproduce ({scale})", extras_first=True)
        return
    doc, _ = render_report(f"prefixlab reproduce ({scale})", extras)
    write_report(out, doc)
