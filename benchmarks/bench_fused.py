"""Fused runs (tuning/fused.py): K tuned runs in one forward/backward vs the same runs one by one.

    python benchmarks/bench_fused.py [--runs 3] [--steps 20] [--sweep-steps 6] [--skip-e3] [--skip-sweep]

1. E3: the six P=10 Simple-share prefix runs of E3, docs/papers.md §3 (mix4's four tasks, ascending_add1,
   double_hist) on one 4/4/256 base with 12 token slots, through `finetune_many` (fused) and
   `finetune` one after another (sequential), end to end (evaluations and run directories
   included). Target: fused >= 3x faster, with the same metrics. The base is a 1-step pretrain
   (the speed does not depend on what it learned).
2. Sweep: training throughput (sequences/s of the loop's steps, evaluations excluded) of K fused
   prefix runs, K = 1, 2, 4, 8, 16, at the quick width (4/4/128) and the paper width (4/4/256),
   and on E1's and E2's base shapes with P=1.
The machine is shared: medians over --runs, fused and sequential interleaved within each run.
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, stats

import torch

from toy_models.pretraining import load_model, pretrain
from toy_models.tasks import MIX4, TaskSpec
from toy_models.batched import Member, fit_many
from toy_models.training import TrainConfig
from tuning import make_method
from tuning.fused import finetune_many
from tuning.jobs import method_train_config
from tuning.pipeline import finetune

E3_TASKS = list(MIX4) + ["ascending_add1", "double_hist"]
SPEC = TaskSpec(prompt_len=12)


def make_base(root: Path, d_model: int, preset: str = "petrov-e3", spec: TaskSpec = SPEC) -> Path:
    path = root / f"base-{preset}-{d_model}-{spec.prompt_len}"
    if not path.exists():
        pretrain(path, "mix4", preset, spec, TrainConfig(steps=1, eval_every=1, eval_size=16),
                 model_overrides={"d_model": d_model}, slots="token")
    return path


def e3(root: Path, runs: int, steps: int) -> dict:
    base = make_base(root, 256)
    train = {"steps": steps, "eval_every": max(1, steps // 2), "eval_size": 200}
    opts = {"length": 10, "share": "simple"}
    fused_t, seq_t, same = [], [], []
    for r in range(runs):
        jobs = [dict(method="prefix", task=t, out=root / f"e3-{r}" / "fused" / t, opts=opts, train=train, seed=0)
                for t in E3_TASKS]
        t0 = time.perf_counter()
        fused = finetune_many(base, jobs, max_fused=len(jobs))  # one group of six (the CPU default caps at 4)
        fused_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        seq = [finetune(base, "prefix", t, root / f"e3-{r}" / "seq" / t, opts, {**train, "seed": 0}) for t in E3_TASKS]
        seq_t.append(time.perf_counter() - t0)
        strip = lambda m: {k: v for k, v in m.items() if k != "timing"}  # noqa: E731
        same.append(all(strip(a) == strip(b) for a, b in zip(fused, seq)))
        shutil.rmtree(root / f"e3-{r}")
    return {"runs_fused": len(E3_TASKS), "steps": steps, "eval_size": 200, "eval_every": train["eval_every"],
            "fused_s": stats(fused_t), "sequential_s": stats(seq_t),
            "speedup": statistics.median(seq_t) / statistics.median(fused_t), "target": 3.0,
            "same_metrics_all_runs": all(same)}


def step_throughput(model, K: int, steps: int, P: int = 10, spec: TaskSpec = SPEC) -> float:
    """Sequences/s of K fused prefix runs (the loop's own steps; the last step's evaluation and
    the first step's warm-up excluded)."""
    from toy_models.tasks import resolve_task
    from toy_models.training import Trainable
    members = []
    for k in range(K):
        cfg = method_train_config("prefix", {"steps": steps, "eval_every": steps, "eval_size": 16, "seed": k})
        m = make_method("prefix", model, length=P, share="simple", generator=torch.Generator().manual_seed(k))
        members.append(Member(Trainable(dict(m.named_parameters()), m.state, m.no_decay),
                              resolve_task(E3_TASKS[k % len(E3_TASKS)], spec), cfg))
    marks = []
    fit_many(model, members, spec, progress=lambda s, n, info: marks.append(time.perf_counter()))
    gaps = [b - a for a, b in zip(marks[:-2], marks[1:-1])]  # step 2 .. steps-1
    return K * 64 / statistics.median(gaps)


# (name, preset, d_model, slots, P): E3/E4's quick and paper widths with E3's P=10 prefixes, and
# E1's and E2's bases (1 slot) with their P=1 prefixes
SHAPES = [("4/4/128, P=10", "petrov-e3", 128, 12, 10), ("4/4/256, P=10", "petrov-e3", 256, 12, 10),
          ("E1 1/1/96, P=1", "petrov-e1", 96, 1, 1), ("E2 1/4/256, P=1", "petrov-e2", 256, 1, 1)]


def sweep(root: Path, runs: int, steps: int) -> dict:
    out = {}
    for name, preset, d, slots, P in SHAPES:
        spec = TaskSpec(prompt_len=slots)
        model, _ = load_model(make_base(root, d, preset, spec))
        per = {K: [] for K in (1, 2, 4, 8, 16)}
        for _ in range(runs):
            for K in per:
                per[K].append(step_throughput(model, K, steps, P, spec))
        single = statistics.median(per[1])
        out[name] = {str(K): {"seqs_per_s": stats(v), "speedup_vs_runs_alone": statistics.median(v) / single}
                     for K, v in per.items()}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="steps per E3 run")
    ap.add_argument("--sweep-steps", type=int, default=6)
    ap.add_argument("--skip-e3", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    out = {"machine": machine()}
    root = Path(tempfile.mkdtemp())
    try:
        if not args.skip_e3:
            out["e3_six_prefixes"] = e3(root, args.runs, args.steps)
        if not args.skip_sweep:
            out["sweep_prefix_P10_batch64"] = sweep(root, args.runs, args.sweep_steps)
    finally:
        shutil.rmtree(root)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
