"""Do a run's bits depend on the torch thread count? (what `--workers 1` vs `--workers 2` changes)

    python benchmarks/bench_threads.py [--steps 60] [--threads 1,2,2,1] [--skip-cost]

Each entry of --threads is a fresh process pinned to that many threads. It pretrains the quick
E3/E4 shape (4/4/128, mix4, 12 slots) for --steps steps and tunes a rank-1 LoRA on double_hist
on it for as many, then hashes the saved tensors. A sequential study runs at the default thread
count (2 here) and a `--workers 2` study at 1 thread per task, so when the hashes differ the two
studies differ in float summation order, and rows that sit on a threshold can move.
Training takes torch's deterministic kernels on the CPU (`toy_models.training.cpu_deterministic`);
It also times pretraining steps of the 4/4/128 and 4/4/256 shapes at 2 threads with them on
and off, alternating rounds in one process (medians).
Prints JSON: the hashes per process, whether equal thread counts and different thread counts
gave identical bits, and the cost.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import machine

WORKER = r"""
import hashlib, json, sys, tempfile
from pathlib import Path
import torch
from safetensors.torch import load_file
from toy_models.pretraining import pretrain
from toy_models.tasks import TaskSpec
from toy_models.training import TrainConfig
from tuning.pipeline import finetune
steps = int(sys.argv[1])
d = Path(tempfile.mkdtemp())
pretrain(d / "base", "mix4", "petrov-e3", TaskSpec(prompt_len=12),
         TrainConfig(steps=steps, lr=2e-3, eval_every=steps, eval_size=200, warmup=10), {"d_model": 128})
finetune(d / "base", "lora", "double_hist", d / "lora", {"rank": 1},
         {"steps": steps, "lr": 5e-3, "schedule": "constant", "warmup": 0, "eval_every": steps, "eval_size": 200})
def h(run):
    t = load_file(str(next((d / run).rglob("*.safetensors"))))
    return hashlib.sha256(b"".join(t[k].numpy().tobytes() for k in sorted(t))).hexdigest()[:16]
print(json.dumps({"threads": torch.get_num_threads(), "base": h("base"), "lora": h("lora")}))
"""


def cost(rounds: int = 4, steps: int = 20) -> dict:
    import statistics
    import time

    import numpy as np
    import torch

    from toy_models.model import ToyTransformer, preset_config
    from toy_models.tasks import TaskSpec, resolve_task, sample_batch
    from toy_models.training import Trainable, loss_on

    torch.set_num_threads(2)
    spec = TaskSpec(prompt_len=12)
    task = resolve_task("mix4", spec)
    out = {}
    for d in (128, 256):
        cfg = preset_config("petrov-e3", d_vocab=spec.vocab_size, n_ctx=spec.n_ctx, n_prompt=12, d_model=d)
        torch.manual_seed(0)
        model = ToyTransformer(cfg).train()
        tr = Trainable(dict(model.named_parameters()), lambda: None)
        opt = torch.optim.AdamW(list(tr.params.values()), lr=2e-3)
        rng = np.random.default_rng(0)
        t = {"default": [], "deterministic": []}
        for _ in range(rounds):
            for name in t:
                torch.use_deterministic_algorithms(name == "deterministic")
                for i in range(steps + 5):
                    if i == 5:
                        t0 = time.perf_counter()
                    loss = loss_on(model, sample_batch(task, spec, 64, rng), tr.to_state())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                t[name].append(steps / (time.perf_counter() - t0))
        torch.use_deterministic_algorithms(False)
        med = {k: statistics.median(v) for k, v in t.items()}
        out[f"4/4/{d}"] = {"steps_per_s": med, "all": t, "ratio": med["deterministic"] / med["default"]}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", default="1,2,2,1")
    ap.add_argument("--skip-cost", action="store_true", help="do not time deterministic kernels on vs off")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    runs = []
    for t in [int(x) for x in args.threads.split(",")]:
        env = {**os.environ, "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)}
        out = subprocess.run([sys.executable, "-c", WORKER, str(args.steps)], cwd=root, env=env,
                             capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    bits = lambda r: (r["base"], r["lora"])
    same = [bits(a) == bits(b) for i, a in enumerate(runs) for b in runs[i + 1:] if a["threads"] == b["threads"]]
    diff = [bits(a) == bits(b) for i, a in enumerate(runs) for b in runs[i + 1:] if a["threads"] != b["threads"]]
    print(json.dumps({"machine": machine(), "steps": args.steps, "runs": runs,
                      "identical_at_equal_threads": all(same) if same else None,
                      "identical_across_thread_counts": all(diff) if diff else None,
                      "deterministic_cost": None if args.skip_cost else cost()}, indent=2))


if __name__ == "__main__":
    main()
