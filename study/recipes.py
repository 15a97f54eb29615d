"""papers.md §3's experiments E1-E4 as recipes: model preset, steps and learning rates per preset.

- `paper`: the papers' model sizes (1/1/96, 1/4/256 without LN before attention, 4/4/256) with a
  CPU-friendly optimizer schedule instead of [P]'s 20k-500k steps.
- `quick`: what `make demo` runs: the cheapest recipes found that still reproduce each row of the
  paper-vs-lab table (docs/experiments.md has every configuration tried).
- `micro`: tiny sizes for the end-to-end test; its numbers mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class Recipe:
    preset: str  # model preset of the base
    model: dict  # overrides of the preset (quick sizes)
    pretrain_steps: int
    pretrain_lr: float
    tune_steps: int
    seeds: tuple[int, ...] = (0,)
    eval_size: int = 1000
    batch_size: int = 64
    length: int = 10
    num_digits: int = 8


RECIPES: dict[str, dict[str, Recipe]] = {
    "micro": {
        e: Recipe("micro", {}, 30, 1e-2, 10, eval_size=64, batch_size=16, length=4, num_digits=4)
        for e in ("E1", "E2", "E3", "E4")
    },
    # quick: <= 10 minutes for the whole study on 2 CPU cores. E1 keeps the paper's 1/1/96 model;
    # E2 keeps 1 layer / 4 heads / no LN before attention at d=128; E3/E4 keep 4 layers / 4 heads
    # at d=48 (one shared base). Fewer steps than `paper`.
    "quick": {
        "E1": Recipe("petrov-e1", {}, 2000, 3e-3, 400),
        "E2": Recipe("petrov-e2", {"d_model": 128}, 3000, 3e-3, 400),
        "E3": Recipe("petrov-e3", {"d_model": 48}, 4000, 3e-3, 500),
        "E4": Recipe("petrov-e3", {"d_model": 48}, 4000, 3e-3, 1000),
    },
    "paper": {
        "E1": Recipe("petrov-e1", {}, 6000, 2e-3, 2000, seeds=(0, 1, 2)),
        "E2": Recipe("petrov-e2", {}, 8000, 1e-3, 2000, seeds=(0, 1, 2)),
        "E3": Recipe("petrov-e3", {}, 12000, 1e-3, 2000, seeds=(0, 1, 2)),
        "E4": Recipe("petrov-e3", {}, 12000, 1e-3, 4000, seeds=(0, 1, 2)),
    },
}
