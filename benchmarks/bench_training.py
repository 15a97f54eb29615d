"""Training throughput and model FLOP utilization on the petrov-e3 configuration (P=10, batch 64),
tuning steps/s per method, and the time for the `default` preset to reach 99 % on mix4.

    python benchmarks/bench_training.py [--runs 3] [--skip-time-to-99]
Target: throughput >= 1.5 x 119 seq/s ([P]'s own loop here); prefix and soft-prompt steps/s
>= full fine-tuning's; time to 99 % <= 180 s.
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time

from common import machine, matmul_peak_gflops, stats

import numpy as np
import torch

from toy_models.model import ToyTransformer, preset_config
from toy_models.tasks import TaskSpec, resolve_task, sample_batch
from toy_models.training import Trainable, TrainConfig, loss_on
from tuning import make_method


def steps_per_s(model, method, task, spec, steps=40, warm=5):
    """Training steps/s of the real loop body (sample, forward, backward, clip, AdamW step)."""
    if method is None:
        params = dict(model.named_parameters())
        tr = Trainable(params, lambda: None)
        model.train()
    else:
        tr = Trainable(dict(method.named_parameters()), method.state, method.no_decay)
        model.train(method.defaults.get("train_mode", True))
    opt = torch.optim.AdamW(list(tr.params.values()), lr=1e-3)
    rng = np.random.default_rng(0)
    for i in range(steps + warm):
        if i == warm:
            t0 = time.perf_counter()
        b = sample_batch(task, spec, 64, rng)
        loss = loss_on(model, b, tr.to_state())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(tr.params.values()), 1.0)
        opt.step()
    return steps / (time.perf_counter() - t0)


def model_flops_per_seq(cfg, T):
    n = cfg.n_layers * (4 * cfg.d_model ** 2 + 2 * cfg.d_model * cfg.mlp_width)  # weights per token
    attn = cfg.n_layers * 2 * T * T * cfg.d_model  # scores + weighted sum, per sequence
    return 6 * (n * T + attn) + 6 * T * cfg.d_model * cfg.d_vocab


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-time-to-99", action="store_true")
    ap.add_argument("--ttn-runs", type=int, default=None, help="runs of the time-to-99 %% figure (default --runs)")
    args = ap.parse_args()
    out = {"machine": machine()}
    spec = TaskSpec(prompt_len=10)
    task = resolve_task("mix4", spec)
    cfg = preset_config("petrov-e3", d_vocab=spec.vocab_size, n_ctx=spec.n_ctx, n_prompt=10)
    torch.manual_seed(0)
    model = ToyTransformer(cfg)
    peak = matmul_peak_gflops()
    sps = [steps_per_s(model, None, task, spec) for _ in range(args.runs)]
    seqs = [64 * s for s in sps]
    flops = model_flops_per_seq(cfg, spec.content_len)
    out["petrov_e3_pretrain"] = {"seqs_per_s": stats(seqs), "paper_loop_seqs_per_s": 119,
                                 "speedup_vs_paper": statistics.median(seqs) / 119,
                                 "matmul_peak_gflops": peak,
                                 "mfu": statistics.median(seqs) * flops / (peak * 1e9)}
    for p in model.parameters():
        p.requires_grad_(False)
    per = {}
    for name, opts in (("full", {}), ("lora", {"rank": 1}), ("soft_prompt", {"length": 10}),
                       ("prefix", {"length": 10, "share": "simple"}), ("prefix_deep", {"length": 10, "share": "deep"})):
        meth = name.split("_deep")[0] if name == "prefix_deep" else name
        m = make_method(meth, model, **opts)
        per[name] = stats([steps_per_s(model, m, task, spec, steps=20) for _ in range(args.runs)])
    out["petrov_e3_tuning_steps_per_s"] = per
    out["context_methods_at_least_full"] = all(per[k]["median"] >= per["full"]["median"]
                                               for k in ("soft_prompt", "prefix"))
    if not args.skip_time_to_99:
        from toy_models.pipeline import PRETRAIN_DEFAULTS, pretrain
        times, finals = [], []
        for r in range(args.ttn_runs or args.runs):
            d = tempfile.mkdtemp()
            try:
                t0 = time.perf_counter()
                m = pretrain(f"{d}/run", "mix4", "default", TaskSpec(),
                             TrainConfig(**{**PRETRAIN_DEFAULTS, "stop_at": 0.99, "seed": r}))
                times.append(time.perf_counter() - t0 if m["exact_acc"] >= 0.99 else float("inf"))
                finals.append({"exact_acc": m["exact_acc"], "steps": m["steps"], "seconds": time.perf_counter() - t0})
            finally:
                shutil.rmtree(d)
        out["default_mix4_time_to_99_s"] = {**stats(times), "target_s": 180, "final": finals}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
