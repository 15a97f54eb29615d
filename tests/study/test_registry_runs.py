"""Every experiment of the registry at micro scale, generated from the registry (a new experiment
is covered without editing this file): it runs, a second study reuses its cached stage, and its
result yields table rows and a report section. The paper-only experiments run at their micro
settings here (`stages_for(..., every_scale=True)`)."""

import importlib

import pytest

from engine.driver import run_stages
from study.experiments.registry import EXPERIMENTS, REGISTRY
from study.stages import stages_for


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("registry-micro")
    try:
        first = run_stages(out, stages_for("micro", out, every_scale=True))
        second = run_stages(out, stages_for("micro", out, every_scale=True))
    finally:
        torch.set_num_threads(before)
    return first, second


@pytest.mark.parametrize("name", [e.name for e in REGISTRY])
def test_each_experiment_runs_caches_and_yields_rows_and_a_section(studies, name):
    first, second = studies
    e = EXPERIMENTS[name]
    rec = first[name]
    assert rec["status"] == "done", rec.get("error")
    assert not rec["cached"] and second[name]["cached"] and second[name]["result"] == rec["result"]
    rows = e.rows(rec["result"])
    assert rows and all(r["claim"] and r["verdict"] for r in rows)
    title, items, *_ = importlib.import_module(f"reports.experiments.{e.section}").section(rec["result"], first)
    assert isinstance(title, str) and title and items
