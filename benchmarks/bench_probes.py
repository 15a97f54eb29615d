"""Probe latency: all four probes over 1,000 sequences on the petrov-e3 model (target <= 10 s),
and peak memory against the number of inputs (it must grow linearly: batched, no full cache).

    python benchmarks/bench_probes.py [--runs 3]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import machine, stats

import torch

from probes.clusters import activation_clusters
from probes.compute import identity_probes
from toy_models.model import ToyTransformer, preset_config
from toy_models.tasks import TaskSpec, fixed_test_set, resolve_task
from tuning import make_method


def setup(n):
    spec = TaskSpec(prompt_len=10)
    cfg = preset_config("petrov-e3", d_vocab=spec.vocab_size, n_ctx=spec.n_ctx, n_prompt=10)
    torch.manual_seed(0)
    model = ToyTransformer(cfg).eval()
    tokens = fixed_test_set(resolve_task("mix4", spec), spec, n).content
    states = {t: make_method("prefix", model, length=10, generator=torch.Generator().manual_seed(i)).state()
              for i, t in enumerate(("ascending", "descending", "add1", "add2"))}
    return model, tokens, states, spec


def all_probes(model, tokens, states, spec):
    """What `prefixlab probe` runs: invariance, bias and drift in one shared pass, then clusters."""
    identity_probes(model, states["ascending"], tokens, ["invariance", "bias", "drift"])
    activation_clusters(model, states, tokens, position=spec.length - 1)


def peak_rss_mb(n):
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_probes as b, resource; "
            f"m, t, s, sp = b.setup({n}); b.all_probes(m, t, s, sp); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    model, tokens, states, spec = setup(1000)
    with torch.no_grad():
        all_probes(model, tokens[:50], states, spec)  # warm-up
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        with torch.no_grad():
            all_probes(model, tokens, states, spec)
        times.append(time.perf_counter() - t)
    mem = {n: peak_rss_mb(n) for n in (250, 1000, 4000)}
    slope = (mem[4000] - mem[1000]) / 3000
    out = {"machine": machine(), "four_probes_1000_seqs_petrov_e3_s": {**stats(times), "target_s": 10},
           "peak_rss_mb_by_inputs": mem, "rss_mb_per_extra_input": slope,
           "note": "peak RSS includes the interpreter and torch (~constant); per-input growth is the slope"}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
