"""bf16 against fp32 on this machine: the matmul peaks (the physical limit) and the study's steps.

    python benchmarks/bench_precision.py [--runs 3] [--steps 16] [--threads 1]

1. Matmul peak: GFLOP/s of square n x n matmuls (n = 256 ... 2048) in fp32 and in bf16 (bf16
   tensors, what autocast hands the matmul kernels), each the fastest of 10 repetitions; the peak
   is the best median of those over the sizes.
2. The study's training steps (batch 64, the quick study's shapes and the paper's 4/4/256), each a
   whole step: batch, forward, backward, clip, AdamW. fp32 and bf16 autocast alternate within each
   run, so their ratio is measured side by side. A step's matmul FLOPs are counted once with
   torch's FlopCounterMode; from them, each precision's share of its own matmul peak.
Medians over --runs; `toy_models/precision.py` cites the ratios for its CPU default (fp32).
"""

import argparse
import json
import statistics
import time

from common import machine, matmul_peak_gflops, stats

# (name, preset, model overrides, what trains, prompt slots): the quick study's stages, and the paper base
STEPS = [
    ("E1 base pretraining 1/1/96 (quick)", "petrov-e1", {}, "pretrain", 1),
    ("E2 base pretraining 1/4/256, no LN (quick)", "petrov-e2", {}, "pretrain", 1),
    ("E3/E4 base pretraining 4/4/128 (quick)", "petrov-e3", {"d_model": 128}, "pretrain", 12),
    ("E3 P=10 prefix 4/4/128 (quick)", "petrov-e3", {"d_model": 128}, "prefix10", 12),
    ("E4 rank-1 LoRA 4/4/128 (on the quick E3 base)", "petrov-e3", {"d_model": 128}, "lora", 12),
    ("E4 base pretraining 4/4/256 (quick; paper E3/E4)", "petrov-e3", {}, "pretrain", 12),
    ("E4 rank-1 LoRA 4/4/256 (quick; paper)", "petrov-e3", {}, "lora", 12),
    ("E4 P=12 prefix 4/4/256 (quick; paper)", "petrov-e3", {}, "prefix12", 12),
]


def setup(preset: str, over: dict, kind: str, slots: int):
    """A fresh random model of the stage's shape, its trainable tensors and one step function."""
    import numpy as np
    import torch
    from toy_models.model import ToyTransformer, preset_config
    from toy_models.tasks import TaskSpec, resolve_task, sample_batch
    from toy_models.training import loss_on
    from tuning import make_method
    spec = TaskSpec(prompt_len=slots)
    task = resolve_task("mix4" if kind == "pretrain" else "double_hist", spec)
    cfg = preset_config(preset, d_vocab=spec.vocab_size, n_ctx=spec.n_ctx, n_prompt=slots, slots="token", **over)
    torch.manual_seed(0)
    model = ToyTransformer(cfg)
    if kind == "pretrain":
        model.train()
        params, state = list(model.parameters()), (lambda: None)
    else:
        model.eval()
        model.requires_grad_(False)
        m = (make_method("prefix", model, length=int(kind[6:]), share="simple") if kind.startswith("prefix")
             else make_method("lora", model, rank=1))
        params, state = list(m.parameters()), m.state
    opt = torch.optim.AdamW(params, lr=1e-4)
    rng = np.random.default_rng(0)

    def step(bf16: bool) -> None:
        b = sample_batch(task, spec, 64, rng)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = loss_on(model, b, state())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return step


def step_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        step(False)
    return fc.get_total_flops()


def time_steps(step, bf16: bool, n: int) -> float:
    for _ in range(2):
        step(bf16)
    t = time.perf_counter()
    for _ in range(n):
        step(bf16)
    return (time.perf_counter() - t) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the study's workers use 1)")
    ap.add_argument("--only", default=None, help="time only the steps whose name contains this text")
    args = ap.parse_args()
    import torch
    from toy_models.precision import cpu_bf16_flags
    torch.set_num_threads(args.threads)
    out = {"machine": machine(), "threads": args.threads, "cpu_bf16_flags": list(cpu_bf16_flags()),
           "matmul_gflops": {}, "steps": {}}
    for n in (256, 512, 1024, 2048):
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            xs = [matmul_peak_gflops(n, 10, dtype) for _ in range(args.runs)]
            out["matmul_gflops"][f"{name} {n}x{n}"] = stats(xs)
    peak = {p: max(v["median"] for k, v in out["matmul_gflops"].items() if k.startswith(p)) for p in ("fp32", "bf16")}
    out["matmul_peak_gflops"] = {**peak, "bf16_vs_fp32": peak["bf16"] / peak["fp32"]}
    for name, preset, over, kind, slots in STEPS:
        if args.only and args.only not in name:
            continue
        step = setup(preset, over, kind, slots)
        flops = step_flops(step)
        t32, t16 = [], []
        for _ in range(args.runs):  # alternating: the ratio is taken side by side
            t32.append(time_steps(step, False, args.steps))
            t16.append(time_steps(step, True, args.steps))
        m32, m16 = statistics.median(t32), statistics.median(t16)
        out["steps"][name] = {
            "step_s_fp32": stats(t32), "step_s_bf16": stats(t16), "bf16_speedup": m32 / m16,
            "matmul_gflop_per_step": flops / 1e9,
            "share_of_fp32_peak": flops / m32 / 1e9 / peak["fp32"],
            "share_of_bf16_peak": flops / m16 / 1e9 / peak["bf16"]}
    out["summary"] = {k: round(v["bf16_speedup"], 3) for k, v in out["steps"].items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
