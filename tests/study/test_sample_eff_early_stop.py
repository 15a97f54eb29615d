"""The sample-efficiency stage with an early stop in its config (study.experiments.sample_eff,
"early_stop"): every run carries the rule in its config, stops on the stage's own validation
set and records where it stopped; a config without it trains as before. Micro preset: structure
only, never the science numbers."""

import json
from pathlib import Path

import pytest
import torch

from engine.driver import run_stages
from study.experiments import sample_eff
from study.experiments.sample_eff import SAMPLE_EFF, early_stop
from study.stages import stages_for

torch.set_num_threads(1)

RULE = {"patience": 2, "min_delta": 1e-3, "eval_every": 2}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sample_eff.SAMPLE_EFF, "micro", {**SAMPLE_EFF["micro"], "early_stop": RULE})
        rec = run_stages(out, stages_for("micro", out), only=["sample_eff"])["sample_eff"]
    assert rec["status"] == "done", rec.get("traceback")
    return out, rec


def test_every_run_carries_the_rule_and_records_its_stop(stage):
    out, rec = stage
    r, cfg = rec["result"], SAMPLE_EFF["micro"]
    assert r["early_stop"] == RULE and rec["config"]["early_stop"] == RULE
    runs = [p for p in (out / "stages" / f"sample_eff-{rec['key']}").iterdir() if p.is_dir()]
    assert runs
    for path in runs:
        train = json.loads((path / "config.json").read_text())["train"]
        assert {k: train[k] for k in RULE} == RULE and train["val_size"] == cfg["val_size"]
        m = json.loads((path / "metrics.json").read_text())
        assert 0 < m["best_step"] <= m["steps"] <= cfg["steps"] and m["best_step"] % RULE["eval_every"] == 0
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == m["steps"] and min(x["val_loss"] for x in rows) == m["val_loss"]
    # the steps each run trained, per variant, size and seed
    for v in cfg["variants"]:
        for n, steps in r["steps_trained"][v].items():
            assert len(steps) == len(cfg["seeds"]) and all(0 < s <= cfg["steps"] for s in steps)


def test_the_early_stop_reads_the_stage_validation_set(stage):
    """The loss a run stopped on is the stage's held-out validation loss of its saved tensors."""
    from study.experiments.sample_eff import held_out_losses, validation_set
    from toy_models.tasks import TaskSpec, fixed_test_set, resolve_task
    out, rec = stage
    path = Path(rec["result"]["runs"]["simple/8"])
    conf = json.loads((path / "config.json").read_text())
    spec = TaskSpec(**conf["task_spec"])
    val = validation_set(conf["task"], spec, conf["train"]["val_size"])
    held = held_out_losses(path, val, fixed_test_set(resolve_task(conf["task"], spec), spec, 64))
    m = json.loads((path / "metrics.json").read_text())
    assert held["val_loss"] == pytest.approx(m["val_loss"], rel=1e-5)


def test_configs_without_the_rule_train_as_before():
    """No scale's recipe stops early (docs/experiments.md: measured on the quick stage, it changed
    the chosen rates and the n = 64 results); the option maps onto the runs' training options."""
    assert all(early_stop(cfg) == {} for cfg in SAMPLE_EFF.values())
    got = early_stop({**SAMPLE_EFF["micro"], "early_stop": RULE})
    assert got == {**RULE, "val_size": SAMPLE_EFF["micro"]["val_size"]}
