"""What this machine allows: the ceilings of the fused-runs and parallel-workers speedup targets
(bench_fused.py, bench_reproduce.py), measured.

    python benchmarks/bench_ceiling.py [--runs 3] [--steps 12]

Both targets assume spare compute that a 2-core CPU may not have. This measures the training step
of the study's own shapes (4/4/128 and 4/4/256 bases with 12 SLOT slots, a P=10 Simple-share
prefix, a rank-1 LoRA, and pretraining with dropout) and derives the best any scheduler could do:

1. batching: the forward+backward of one batch of 64*K sequences against K steps of one run at
   batch 64 (data drawn, AdamW stepped). A fused group of K runs is one 64*K batch, so fusing can
   at most gain K * t_step(64) / t_fwd_bwd(64*K), with every per-run cost hidden for free.
2. workers: one step at 2 torch threads (what `--workers 1` runs), at 1 thread alone, and in two
   1-thread processes at once (what `--workers 2` runs). Perfectly balanced independent work can
   at most gain 2 * t(2 threads) / t(1 thread, two processes at once).
Medians over --runs; each figure is measured in a fresh process with its thread count pinned.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, stats

HERE = Path(__file__).resolve()


def worker(kind: str, d: int, batch: int, steps: int) -> float:
    """Median seconds per step of `kind` on a fresh random base of width d (what is measured does
    not depend on the weights)."""
    import numpy as np
    import torch
    from toy_models.model import ToyTransformer, preset_config
    from toy_models.tasks import TaskSpec, resolve_task, sample_batch
    from toy_models.training import loss_on
    from tuning import make_method
    spec = TaskSpec(prompt_len=12)
    task = resolve_task("mix4" if kind == "pretrain" else "double_hist", spec)
    cfg = preset_config("petrov-e3", d_model=d, d_vocab=spec.vocab_size, n_ctx=spec.n_ctx, n_prompt=12,
                        slots="token")
    torch.manual_seed(0)
    model = ToyTransformer(cfg)
    rng = np.random.default_rng(0)
    if kind == "pretrain":  # [P]'s pretraining: every weight trains, dropout on
        model.train()
        params, state = list(model.parameters()), None
    else:  # tuning: frozen base in eval mode, the method's tensors train
        model.eval()
        model.requires_grad_(False)
        m = make_method("prefix", model, length=10, share="simple") if kind.startswith("prefix") else \
            make_method("lora", model, rank=1)
        params, state = list(m.parameters()), m.state
    opt = torch.optim.AdamW(params, lr=1e-3)
    fixed = sample_batch(task, spec, batch, rng)
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        if kind.endswith("fwdbwd"):  # the forward and backward only, on a batch drawn beforehand
            loss_on(model, fixed, state() if callable(state) else state).backward()
        else:  # a whole step of a run: its batch, forward, backward, clip, AdamW
            b = sample_batch(task, spec, batch, rng)
            loss = loss_on(model, b, state() if callable(state) else state)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def spawn(kind: str, d: int, batch: int, steps: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, str(HERE), "--worker", kind, str(d), str(batch), str(steps),
                             str(threads)], stdout=subprocess.PIPE, text=True, env=env)


def measure(kind, d, batch, steps, threads, concurrent=1) -> list[float]:
    procs = [spawn(kind, d, batch, steps, threads) for _ in range(concurrent)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--worker", nargs=5, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, d, batch, steps, threads = args.worker
        import torch
        torch.set_num_threads(int(threads))
        print(worker(kind, int(d), int(batch), int(steps)))
        return
    out = {"machine": machine(), "batching": {}, "workers": {}}
    Ks = (2, 6, 16)
    for d in (128, 256):
        step64, fb = [], {K: [] for K in Ks}
        for _ in range(args.runs):
            step64 += measure("prefix", d, 64, args.steps, 2)
            for K in Ks:
                fb[K] += measure("prefix_fwdbwd", d, 64 * K, max(4, args.steps // 2), 2)
        t1 = statistics.median(step64)
        out["batching"][f"4/4/{d}"] = {
            "step_s_batch64": stats(step64),
            **{f"fwd_bwd_s_batch{64 * K}": stats(fb[K]) for K in Ks},
            "fused_speedup_ceiling": {str(K): K * t1 / statistics.median(fb[K]) for K in Ks}}
    for kind in ("prefix", "lora", "pretrain"):
        two, one, pair = [], [], []
        for _ in range(args.runs):
            two += measure(kind, 128, 64, args.steps, 2)
            one += measure(kind, 128, 64, args.steps, 1)
            pair += measure(kind, 128, 64, args.steps, 1, concurrent=2)
        t2, tp = statistics.median(two), statistics.median(pair)
        out["workers"][f"{kind} 4/4/128 batch 64"] = {
            "step_s_2_threads": stats(two), "step_s_1_thread": stats(one),
            "step_s_1_thread_two_processes_at_once": stats(pair),
            "two_threads_vs_one": statistics.median(one) / t2,
            "workers2_vs_workers1_ceiling": 2 * t2 / tp}
    ceil = [v["workers2_vs_workers1_ceiling"] for v in out["workers"].values()]
    out["summary"] = {"fused_K6_ceiling": {k: v["fused_speedup_ceiling"]["6"] for k, v in out["batching"].items()},
                      "fused_target": 3.0, "workers2_ceiling_range": [min(ceil), max(ceil)], "workers_target": 1.5}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
