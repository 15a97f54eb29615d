"""`prefixlab probe`: run the registered probes (probes/registry.py) on tuned runs and write
probe.json + probe.safetensors. `collect` is the one place probes are computed, for this command
and for the report (reports/build.py renders what it returns)."""

from __future__ import annotations

from pathlib import Path

import torch

from probes.common import accumulate, probe_inputs, require_state
from probes.hierarchy import check_hierarchy, classify
from probes.registry import PROBES
from prefixlab_common.errors import UserError
from toy_models.pretraining import LoadedRun
from toy_models.runs import RunDir, save_tensors, write_json
from toy_models.training import resolve_device
from tuning.pipeline import load_run

__all__ = ["PROBES", "collect", "identity_probes", "load_tuned_runs", "probe_inputs", "run_probes"]


def check_probes(which: list[str] | None) -> list[str]:
    """The probes asked for, in registry order (None: all)."""
    if which is None:
        return list(PROBES)
    bad = [p for p in which if p not in PROBES]
    if bad or not which:
        raise UserError(f"unknown probe {bad[0] if bad else ''!r}; known: {', '.join(PROBES)}")
    return [p for p in PROBES if p in which]


def identity_probes(model, state, tokens, which: list[str], layers=None, heads=None) -> dict:
    """The per-run probes in `which` in one pass: each batch's base and method forwards run once."""
    state = require_state(state)
    n = int(tokens.shape[0])
    names = [p for p in PROBES if p in which and PROBES[p].accumulator is not None]
    accs = [PROBES[p].accumulator(model, layers, heads, n) for p in names]
    return dict(zip(names, accumulate(model, state, tokens, accs)))


def collect(runs: list[LoadedRun], which: list[str], n_inputs: int, layers=None, heads=None, key=None) -> dict:
    """Every probe in `which` on tuned `runs` of one base: {"runs": [per run {probe: result}],
    probe: result for each across-runs probe}. Per-run probes see the run's own test inputs;
    key(run) names a run's points in across-runs probes (default 'task (run name)')."""
    key = key or (lambda r: f"{r.config['task']} ({r.name})")
    out: dict = {"runs": [identity_probes(r.model, r.state, probe_inputs(r, n_inputs), which, layers, heads)
                          for r in runs]}
    for name in which:
        if PROBES[name].across is not None:
            out[name] = PROBES[name].across(runs, n_inputs, key)
    return out


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


def run_probes(paths: list[Path], probes: list[str] | None, out: Path, layers: list[int] | None = None,
               heads: list[int] | None = None, n_inputs: int = 1000, overwrite: bool = False,
               device=None) -> dict:
    probes = check_probes(probes)
    if n_inputs <= 0:
        raise UserError(f"--inputs must be positive, got {n_inputs}")
    asked = resolve_device(device)
    runs = load_tuned_runs(paths)
    out_dir = RunDir(out)
    out_dir.check_new(overwrite, False, resumable=False)
    report: dict = {"runs": {}, "verdicts": [], "device": str(PROBE_DEVICE), "probes": probes}
    if asked != PROBE_DEVICE:
        report["device_note"] = f"--device {asked} asked; the probes compute on the CPU in fp32"
    tensors: dict[str, torch.Tensor] = {}
    # invariance always runs: the hierarchy class uses its layer-0 verdict
    results = collect(runs, ["invariance"] + [p for p in probes if p != "invariance"], n_inputs, layers, heads)
    for r, res in zip(runs, results["runs"]):
        entry: dict = {"method": r.config["method"], "task": r.config["task"]}
        for name in probes:
            if name not in res:
                continue
            entry[name] = res[name].to_json()
            tensors.update({f"{r.name}.{k}": v for k, v in res[name].tensors().items()})
            if PROBES[name].verdict is not None:
                report["verdicts"].append(_verdict(r, *PROBES[name].verdict(res[name])))
        entry["hierarchy"] = classify(r.model, r.state, res["invariance"].summary["layer0_invariant"])
        report["runs"][r.name] = entry
    for name in probes:
        if name in results:
            report[name] = results[name].to_json()
            tensors.update(results[name].tensors())
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
