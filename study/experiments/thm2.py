"""[P]'s Theorem 2 and the capacity count (docs/papers.md §3, §5): one virtual token realises any
map [V]→[V], and virtual first tokens reach more completions than hard ones. The stage, its rows
and its declaration."""

from __future__ import annotations

from pathlib import Path

from study.experiments.declaration import Experiment
from study.rows import row
from theory.constructions import capacity_count, thm2_check


def run(d: Path, cfg: dict, up: dict, progress=None, device=None) -> dict:
    return {"thm2": [thm2_check(V, None, n_maps=cfg["n_maps"], seed=0).to_json() for V in cfg["V"]],
            "capacity": capacity_count(n_virtual=cfg.get("n_virtual", 10000)).to_json()}


def config(scale: str, recipes: dict) -> dict:
    micro = scale == "micro"
    return {"V": [4] if micro else [10, 30], "n_maps": 5 if micro else 100, **({"n_virtual": 500} if micro else {})}


def rows(t2: dict) -> list[dict]:
    ok = all(c.get("success_rate", 0) == 1.0 for c in t2["thm2"])
    cap = t2["capacity"]
    return [row("[P] Thm 2", "one virtual token realises any map [V]→[V]", "V^V maps",
                "; ".join(f"V={c.get('V')}: {100 * c.get('success_rate', 0):.1f} %" for c in t2["thm2"]), ok, "all maps exact"),
            row("[P] §3", "virtual tokens reach more completions than hard tokens", "24,426 hard vs 46,812 virtual (LLaMA-7B)",
                f"{cap.get('hard_distinct')} hard vs {cap.get('virtual_distinct')} virtual",
                (cap.get("virtual_distinct") or 0) > (cap.get("hard_distinct") or 0), "virtual > hard")]


EXPERIMENT = Experiment(
    name="thm2", title="Theorem 2 and the capacity count", run=run, config=config, rows=rows,
    estimate=lambda cfg: 5.0, section="thm2")
