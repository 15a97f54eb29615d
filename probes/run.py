"""`prefixlab probe`: run the probes on tuned runs and write probe.json + probe.safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from probes.bias import BiasAcc
from probes.clusters import activation_clusters
from probes.common import accumulate, require_state
from probes.drift import DriftAcc
from probes.hierarchy import check_hierarchy, classify
from probes.invariance import InvarianceAcc
from toy_models.errors import UserError
from toy_models.pipeline import LoadedRun
from tuning.pipeline import load_run
from toy_models.runs import RunDir, save_tensors, write_json
from toy_models.tasks import fixed_test_set, resolve_task
from toy_models.training import resolve_device

PROBES = ("invariance", "bias", "clusters", "drift")


def probe_inputs(run: LoadedRun, n: int, seed: int = 4321) -> torch.Tensor:
    """Content tokens of n fixed test inputs of the run's task."""
    if n <= 0:
        raise UserError(f"--inputs must be positive, got {n}")
    return fixed_test_set(resolve_task(run.config["task"], run.spec), run.spec, n, seed).content


def identity_probes(model, state, tokens, which: list[str], layers=None, heads=None) -> dict:
    """invariance / bias / drift in one pass: each batch's base and method forwards run once."""
    state = require_state(state)
    n = int(tokens.shape[0])
    make = {"invariance": lambda: InvarianceAcc(model, layers, heads, n),
            "bias": lambda: BiasAcc(model, layers, heads, n), "drift": lambda: DriftAcc(model, n)}
    names = [w for w in ("invariance", "bias", "drift") if w in which]
    return dict(zip(names, accumulate(model, state, tokens, [make[w]() for w in names])))


def load_tuned_runs(paths: list[Path]) -> list[LoadedRun]:
    runs = [load_run(p) for p in paths]
    for r in runs:
        if r.state is None:
            raise UserError(f"{r.path} is a base run with no method: a probe compares a tuned run "
                            f"with its base (pass runs written by `prefixlab finetune`)")
    shas = {r.config["base"]["sha256"] for r in runs}
    if len(shas) > 1:
        raise UserError("these runs were tuned from different base checkpoints; probe runs of one base together")
    return runs


# The probes' accumulators (probes/invariance.py, bias.py, drift.py, clusters.py, hierarchy.py)
# keep their statistics in CPU tensors, so the probes compute on the CPU, in fp32, whatever
# device is asked for; the device is validated and recorded.
PROBE_DEVICE = torch.device("cpu")


def run_probes(paths: list[Path], probes: list[str], out: Path, layers: list[int] | None = None,
               heads: list[int] | None = None, n_inputs: int = 1000, overwrite: bool = False,
               device=None) -> dict:
    bad = [p for p in probes if p not in PROBES]
    if bad or not probes:
        raise UserError(f"unknown probe {bad[0] if bad else ''!r}; known: {', '.join(PROBES)}")
    asked = resolve_device(device)
    runs = load_tuned_runs(paths)
    out_dir = RunDir(out)
    out_dir.check_new(overwrite, False)
    report: dict = {"runs": {}, "verdicts": [], "device": str(PROBE_DEVICE)}
    if asked != PROBE_DEVICE:
        report["device_note"] = f"--device {asked} asked; the probes compute on the CPU in fp32"
    tensors: dict[str, torch.Tensor] = {}
    for r in runs:
        tokens = probe_inputs(r, n_inputs)
        entry: dict = {"method": r.config["method"], "task": r.config["task"]}
        # invariance always runs: the hierarchy class uses its layer-0 verdict
        res = identity_probes(r.model, r.state, tokens, ["invariance"] + list(probes), layers, heads)
        inv = res["invariance"]
        inv_ok = inv.summary["layer0_invariant"]
        if "invariance" in probes:
            entry["invariance"] = inv.to_json()
            tensors.update({f"{r.name}.{k}": v for k, v in inv.tensors().items()})
            report["verdicts"].append(_verdict(r, "layer-0 attention invariance", inv_ok,
                                               inv.summary["layer0_max_abs_diff"]))
        if "bias" in probes:
            b = res["bias"]
            entry["bias"] = b.to_json()
            tensors.update({f"{r.name}.{k}": v for k, v in b.tensors().items()})
            report["verdicts"].append(_verdict(r, "layer-0 bias decomposition", b.summary["layer0_identity_holds"],
                                               b.summary["layer0_rel_residual"]))
        if "drift" in probes:
            d = res["drift"]
            entry["drift"] = d.to_json()
            tensors.update({f"{r.name}.{k}": v for k, v in d.tensors().items()})
        entry["hierarchy"] = classify(r.model, r.state, inv_ok)
        report["runs"][r.name] = entry
    if "clusters" in probes:
        base = runs[0]
        tokens = probe_inputs(base, n_inputs)
        states = {f"{r.config['task']} ({r.name})": r.state for r in runs}
        c = activation_clusters(base.model, states, tokens, position=base.spec.length - 1)
        report["clusters"] = c.to_json()
        tensors.update(c.tensors())
    model = runs[0].model
    slot = runs[0].spec.slot_token
    h = check_hierarchy(model, probe_inputs(runs[0], 8), [slot] * max(1, model.cfg.n_prompt))
    report["hierarchy_checks"] = h.to_json()
    report["verdicts"].append({"run": "(base model)", "identity": "hard prompt = its soft prompt",
                               "holds": h.hard_equals_soft == 0.0, "value": h.hard_equals_soft})
    report["verdicts"].append({"run": "(base model)", "identity": "soft prompt = its prefix",
                               "holds": h.to_json()["soft_equals_prefix"], "value": h.soft_equals_prefix})
    out_dir.prepare(overwrite, False)
    save_tensors(out_dir.path / "probe.safetensors", tensors)
    write_json(out_dir.path / "probe.json", report)
    return report


def _verdict(run: LoadedRun, identity: str, holds: bool | None, value: float | None) -> dict:
    return {"run": run.name, "method": run.config["method"]["name"], "identity": identity,
            "holds": holds, "value": value}
