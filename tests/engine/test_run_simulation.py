"""`benchmarks/bench_reproduce.py --simulate STUDY_DIR`: a finished study's graph with stages, fused
groups and single runs as the unit, its run costs read from the runs' own directories. A synthetic
study: a base, a stage with a fused group of 4 and one of 2, and a stage that trains a grid first."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
bench = pytest.importorskip("bench_reproduce")

from engine.schedule import simulate  # noqa: E402
from engine.timing import longest_chain  # noqa: E402


def _run(stage: Path, name: str, started: str, k: int, secs: float, size: int = 1024, seed: int = 0) -> None:
    d = stage / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"timing": {"fused_runs": k, "train_seconds": secs}}))
    (d / "provenance.json").write_text(json.dumps({"started": f"2030-01-01T{started}+0000"}))
    (d / "config.json").write_text(json.dumps({"seed": seed, "train": {"train_size": size}}))


def _record(stage: Path, name: str, work: float, result: dict | None = None, phases=None) -> None:
    timing = {"work_s": work, "ended": 1.0, **({"phases": phases} if phases else {})}
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "result.json").write_text(json.dumps({"name": name, "key": "k", "status": "done",
                                                   "timing": timing, "result": result or {}}))


@pytest.fixture
def study(tmp_path):
    _record(tmp_path / "stages" / "base-k", "base", 100.0)
    e3 = tmp_path / "stages" / "E3-k"
    for i in range(4):
        _run(e3, f"short{i}", "10:00:00", 4, 200.0 + i)  # one fused group of 4, 203 s
    for i in range(2):
        _run(e3, f"long{i}", "10:00:01", 2, 1200.0)
    _record(e3, "E3", 1410.0)  # 7 s beyond its groups
    se = tmp_path / "stages" / "se-k"
    for i in range(3):
        _run(se, f"grid{i}", "11:00:00", 3, 300.0, size=64)
    for s in (1, 2):
        _run(se, f"final{s}", "12:00:00", 2, 240.0, size=64, seed=s)
    # a record with no phases that ran a grid (one with the rates fixed has an empty "lr_grid")
    _record(se, "se", 560.0, {"lr_grid": {"none": {"0.01": {}}}, "sizes": ["64", "1024"], "seeds": [0, 1, 2]})
    return tmp_path


def test_groups_runs_and_phases_are_read_from_the_run_directories(study):
    units, how = bench.study_units(study, {"E3": ("base",), "se": ("base",)})
    assert how["runs"] == 11 and how["stages"] == 3
    costs, needs = units["group"]
    assert sorted(costs) == ["E3", "E3/p0g0", "E3/p0g1", "base", "se", "se/p0g0", "se/p1g0"]
    assert costs["E3/p0g0"] == 203.0 and costs["E3/p0g1"] == 1200.0 and costs["E3"] == 7.0
    assert needs["se/p1g0"] == ("se/p0g0",) and needs["se/p0g0"] == ("base",) and needs["se"] == ("se/p1g0",)
    run_costs, run_needs = units["run"]
    assert run_costs["E3/long0"] == 600.0 and run_costs["se/grid0"] == 100.0 and run_costs["se/final1"] == 120.0
    assert set(run_needs["se/final1"]) == {"se/grid0", "se/grid1", "se/grid2"}
    for unit in units.values():  # every unit counts the same work
        assert sum(unit[0].values()) == pytest.approx(100.0 + 1410.0 + 560.0)
    assert longest_chain(run_costs, run_needs) == (707.0, ["base", "E3/long0", "E3"])
    assert longest_chain(*units["stage"]) == (1510.0, ["base", "E3"])
    assert simulate(run_costs, run_needs, 8, pinned=True)["wall_s"] == pytest.approx(707.0)
    assert simulate(*units["stage"], 8, pinned=True)["wall_s"] == pytest.approx(1510.0)


def test_recorded_phases_win_over_the_grid_rule(study):
    se = study / "stages" / "se-k"
    _record(se, "se", 560.0, {}, phases=[[300.0, 240.0]])  # one phase: the grid and the finals side by side
    units, _ = bench.study_units(study, {"se": ("base",)})
    assert units["group"][1]["se"] == ("se/p0g0", "se/p0g1")
