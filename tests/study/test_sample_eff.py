"""[L]'s toy sample-efficiency stage (study.experiments.sample_eff), end to end on the
micro preset: structure only, never the science numbers (micro models learn nothing in 10 steps)."""

import json
import math
from pathlib import Path

import pytest
import torch

from engine.driver import run_stages
from study.experiments.sample_eff import SAMPLE_EFF, SAMPLE_EFF_VARIANTS, validation_set
from study.stages import stages_for
from toy_models.tasks import TaskSpec, is_test_input
from tuning.pipeline import load_run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    rec = run_stages(out, stages_for("micro", out), only=["sample_eff"])["sample_eff"]
    assert rec["status"] == "done", rec.get("traceback")
    return out, rec


def test_every_variant_size_and_seed_is_measured(stage):
    _, rec = stage
    cfg, r = SAMPLE_EFF["micro"], stage[1]["result"]
    sizes = ["fresh" if n is None else str(n) for n in cfg["sizes"]]
    assert r["sizes"] == sizes and r["seeds"] == cfg["seeds"]
    for metric in ("acc", "test_loss"):
        assert set(r[metric]) == set(cfg["variants"])
        for v in cfg["variants"]:
            assert set(r[metric][v]) == set(sizes)  # records are read back with sorted keys
            for cell in r[metric][v].values():
                assert len(cell["values"]) == len(cfg["seeds"])
                assert all(math.isfinite(x) for x in cell["values"])
    # accuracies are accuracies, losses are cross-entropies
    assert all(0 <= x <= 1 for v in r["acc"].values() for c in v.values() for x in c["values"])
    assert all(x > 0 for v in r["test_loss"].values() for c in v.values() for x in c["values"])


def test_learning_rate_is_the_validation_argmin_of_its_own_grid(stage):
    r = stage[1]["result"]
    for v, grid in SAMPLE_EFF["micro"]["lr_grid"].items():
        measured = r["lr_grid"][v]
        assert sorted(float(lr) for lr in measured) == sorted(grid)
        best = min(measured, key=lambda lr: measured[lr]["val_loss"])
        assert r["lr"][v] == float(best)


def test_runs_use_their_variant_lr_size_and_are_reused(stage):
    out, rec = stage
    r, cfg = rec["result"], SAMPLE_EFF["micro"]
    d = out / "stages" / f"sample_eff-{rec['key']}"
    runs = sorted(p for p in d.iterdir() if p.is_dir())
    n_grid = sum(len(g) for g in cfg["lr_grid"].values())
    n_main = len(cfg["variants"]) * len(cfg["sizes"]) * len(cfg["seeds"])
    # the selection run of the chosen lr (smallest n, first seed) is reused by the main grid
    assert len(runs) == n_grid + n_main - len(cfg["variants"])
    for key, path in r["runs"].items():
        v, n = key.split("/")
        conf = json.loads((Path(path) / "config.json").read_text())
        train, opts = conf["train"], conf["method"]
        assert train["lr"] == r["lr"][v]
        assert train["train_size"] == (None if n == "fresh" else int(n))
        for k, want in SAMPLE_EFF_VARIANTS[v].items():
            assert opts[k] == want
        assert opts["init"] == "slot"  # every variant starts at the base


def test_validation_set_comes_from_the_train_split():
    spec = TaskSpec(length=4, num_digits=4, prompt_len=2)
    val = validation_set("ascending_add1", spec, 200)
    assert not is_test_input(val.x.numpy()).any()
    # fixed: the same set every time (the choice of lr is reproducible)
    assert torch.equal(val.x, validation_set("ascending_add1", spec, 200).x)


def test_a_second_run_is_cached(stage):
    out, rec = stage
    again = run_stages(out, stages_for("micro", out), only=["sample_eff"])["sample_eff"]
    assert again["cached"] and again["result"] == rec["result"]


def test_rates_fixed_by_the_recipe_train_no_grid_and_give_the_grids_cells(stage, tmp_path):
    """A config with "lr" (the quick scale's) skips the grid: the same jobs at the rates the grid
    chose, so every cell equals the grid stage's, bit for bit at one thread."""
    from study.experiments.sample_eff import run
    from study.recipes import RECIPES
    out, rec = stage
    grid_result = rec["result"]
    cfg = {k: v for k, v in SAMPLE_EFF["micro"].items() if k != "lr_grid"}
    cfg["lr"] = dict(grid_result["lr"])
    res = run(tmp_path / "fixed", out / "bases", RECIPES["micro"]["E3"], cfg)
    assert res["lr"] == grid_result["lr"] and res["lr_grid"] == {} and res["lr_from"] == "recipe"
    runs = [p for p in (tmp_path / "fixed").iterdir() if p.is_dir()]
    assert len(runs) == len(cfg["variants"]) * len(cfg["sizes"]) * len(cfg["seeds"])
    for metric in ("acc", "test_loss"):
        for v, cells in grid_result[metric].items():
            for n, cell in cells.items():
                assert res[metric][v][n]["values"] == cell["values"], (metric, v, n)
