"""Every registered probe (probes/registry.py) runs on micro runs through `prefixlab probe`'s
runner, and `collect` (the one pass the report and the command share) gives what each probe's
own function gives. A new probe is covered here by its registry line alone."""

import json

import pytest
import torch

from probes.bias import bias_decomposition
from probes.clusters import activation_clusters
from probes.common import probe_inputs
from probes.drift import layer_drift
from probes.invariance import attention_invariance
from probes.registry import PROBES
from probes.compute import collect, load_tuned_runs, run_probes
from prefixlab_common.errors import UserError
from toy_models.pretraining import pretrain
from toy_models.tasks import TaskSpec
from toy_models.training import TrainConfig
from tuning.pipeline import finetune

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)
TRAIN = {"steps": 4, "batch_size": 8, "eval_every": 4, "eval_size": 16, "warmup": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-runs")
    pretrain(root / "base", "add1", "micro", SPEC, TrainConfig(steps=30, batch_size=16, eval_every=30, eval_size=16))
    finetune(root / "base", "prefix", "add2", root / "prefix", {"length": 2}, TRAIN)
    finetune(root / "base", "prompt", "ascending", root / "prompt", {"length": 1}, {"batch_size": 16, "eval_size": 16})
    return [root / "prefix", root / "prompt"]


@pytest.mark.parametrize("name", list(PROBES))
def test_every_registered_probe_runs_on_micro_runs(runs, tmp_path, name):
    rep = run_probes(runs, [name], tmp_path / "out", n_inputs=20)
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert saved["probes"] == [name]
    probe = PROBES[name]
    if probe.accumulator is not None:
        assert all(name in entry for entry in rep["runs"].values())
    if probe.across is not None:
        assert name in rep
    if probe.verdict is not None:
        assert {v["run"] for v in rep["verdicts"] if v.get("method")} == {"prefix", "prompt"}
    # a context method keeps layer 0's relative pattern: the invariance behind every class
    assert {n: e["hierarchy"]["class"] for n, e in rep["runs"].items()} == {
        "prefix": "prefix-tuning", "prompt": "prompting (hard prompt)"}


def test_one_pass_equals_each_probe_alone(runs):
    loaded = load_tuned_runs(runs)
    got = collect(loaded, list(PROBES), 30)
    for r, res in zip(loaded, got["runs"]):
        toks = probe_inputs(r, 30)
        alone = {"invariance": attention_invariance(r.model, r.state, toks),
                 "bias": bias_decomposition(r.model, r.state, toks), "drift": layer_drift(r.model, r.state, toks)}
        assert set(res) == set(alone)
        for k in alone:
            a, b = res[k].tensors(), alone[k].tensors()
            assert set(a) == set(b) and all(torch.equal(a[t], b[t]) for t in a), k
    c = activation_clusters(loaded[0].model, {f"{r.config['task']} ({r.name})": r.state for r in loaded},
                            probe_inputs(loaded[0], 30), position=SPEC.length - 1)
    assert all(torch.equal(v, c.tensors()[k]) for k, v in got["clusters"].tensors().items())


def test_unknown_probe_is_refused(runs, tmp_path):
    with pytest.raises(UserError, match="unknown probe 'nope'; known: invariance, bias, clusters, drift"):
        run_probes(runs, ["nope"], tmp_path / "o")
    assert not (tmp_path / "o").exists()
