"""[L]'s reparameterization claim as a simulation (docs/papers.md §6, docs/reparam.md): the study of
`theory.reparam` at the study's scale. The stage, its row and its declaration."""

from __future__ import annotations

from pathlib import Path

from study.experiments.declaration import Experiment
from study.rows import NOT_JUDGED, row
from theory.reparam import ReparamConfig, run_reparam_study
from theory.reparam import table_row as reparam_row


def run(d: Path, cfg: dict, up: dict, progress=None, device=None) -> dict:
    rc = ReparamConfig.quick() if cfg["mode"] == "quick" else (
        ReparamConfig.full() if cfg["mode"] == "full" else ReparamConfig.quick(**cfg["overrides"]))
    res = run_reparam_study(rc, progress=(lambda i, n, info: progress(i, n, {})) if progress else None)
    return res.to_json()


def config(scale: str, recipes: dict) -> dict:
    micro = scale == "micro"
    return {"mode": "micro" if micro else ("quick" if scale == "quick" else "full"),
            "overrides": {"ns": [100, 300], "replicates": 2, "steps": 5, "restarts": 2,
                          "bootstrap": 50, "heldout": 256} if micro else {}}


def rows(rp: dict) -> list[dict]:
    """theory.reparam computes its own verdict; a design too small to decide it (the quick and micro
    scales: one truth, under two decades of n) says so instead of "differs"."""
    r = reparam_row(rp)
    holds = NOT_JUDGED if r["holds"] is None else bool(r["holds"])
    return [row("[L] §6", r["claim"], r["paper"], r["lab"], holds, r["criterion"], r["gap"])]


EXPERIMENT = Experiment(
    name="reparam", title="Reparameterization sample-efficiency study ([L])", run=run, config=config, rows=rows,
    estimate=lambda cfg: {"micro": 4.0, "quick": 50.0}.get(cfg["mode"], 1800.0), section="reparam")
