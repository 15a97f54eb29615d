"""[P]'s Theorem 1 (docs/papers.md §5): one virtual token generates any sequence, checked on the
explicit construction of `theory.constructions`. The stage, its row and its declaration."""

from __future__ import annotations

from pathlib import Path

from study.experiments.declaration import Experiment
from study.rows import row
from theory.constructions import thm1_check, thm1_text


def run(d: Path, cfg: dict, up: dict, progress=None, device=None) -> dict:
    checks = [thm1_check(V, N, n_targets=cfg["n_targets"], seed=0).to_json() for V, N in cfg["sizes"]]
    text = thm1_text(cfg["text"]).to_json()
    return {"checks": checks, "text": text}


def config(scale: str, recipes: dict) -> dict:
    micro = scale == "micro"
    return {"sizes": [[5, 4]] if micro else [[10, 10], [94, 20]], "n_targets": 50 if micro else 1000,
            "text": "I love transformers!"}


def rows(t1: dict) -> list[dict]:
    ok = all(c.get("success_rate", 0) == 1.0 for c in t1["checks"])
    return [row("[P] Thm 1", "one virtual token generates any sequence", "any Y ∈ [V]^N",
                "; ".join(f"V={c.get('V')} N={c.get('N')}: {100 * c.get('success_rate', 0):.1f} %" for c in t1["checks"]),
                ok, "all targets exact")]


EXPERIMENT = Experiment(
    name="thm1", title="Theorem 1: any sequence from one virtual token", run=run, config=config, rows=rows,
    estimate=lambda cfg: 3.0, section="thm1")
