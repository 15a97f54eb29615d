"""tools/sample_eff_sweep.py (docs/experiments.md, "Results: five sizes, three seeds"): a micro sweep
reuses the runs of a previous one and writes the stage's result format for every size and seed."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sample_eff_sweep", ROOT / "tools" / "sample_eff_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_micro_sweep_widens_sizes_and_reuses_runs(sweep, tmp_path, capsys):
    first = tmp_path / "first"
    assert sweep.main(["--scale", "micro", "--out", str(first), "--sizes", "8", "--seeds", "0,1"]) == 0
    res = json.loads((first / "result.json").read_text())
    assert res["sizes"] == ["8"] and res["seeds"] == [0, 1]
    trained = sorted(d.name for d in (first / "runs").glob("prefix-*"))
    assert trained
    for name in trained:  # a mark that only a copy carries over (a retrained run would not have it)
        (first / "runs" / name / "copied-from-first").write_text("")

    wide = tmp_path / "wide"
    assert sweep.main(["--scale", "micro", "--out", str(wide), "--bases", str(first / "bases"),
                       "--sizes", "8,16", "--seeds", "0,1", "--reuse", str(first / "runs")]) == 0
    res = json.loads((wide / "result.json").read_text())
    assert res["sizes"] == ["8", "16"]
    for table in ("acc", "test_loss"):
        assert set(res[table]) == set(res["variants"])
        for v, by_n in res[table].items():
            assert set(by_n) == {"8", "16"} and all(len(c["values"]) == 2 for c in by_n.values())
    # the first sweep's runs were copied, not retrained; the new size's were trained here
    for name in trained:
        assert (wide / "runs" / name / "copied-from-first").exists()
    new = [d for d in (wide / "runs").glob("prefix-*-n16-*")]
    assert new and not any((d / "copied-from-first").exists() for d in new)
    assert "deep512" in capsys.readouterr().out
