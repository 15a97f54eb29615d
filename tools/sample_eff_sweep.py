"""[L]'s toy at more sizes and seeds than the quick study runs (docs/experiments.md, "[L] on the toy").

The quick study's `sample_eff` stage, with its sizes and seeds widened; everything else (base,
task, steps, learning-rate grids, selection at the smallest n with the first seed) is the quick
stage's. Runs already trained by the quick stage are reused when `--reuse` names its directory
(they are copied, never moved). Resumable: a stopped sweep continues run by run.

    OMP_NUM_THREADS=1 python tools/sample_eff_sweep.py --out runs/sweep \\
        --sizes 64,128,256,512,1024 --seeds 0,1,2 [--reuse runs/demo/stages/sample_eff-<key>]

Writes <out>/result.json (the stage's result format) and prints the table. Hours of one core:
each run is about 125 s at one thread on a 2-core box.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from study.experiments.sample_eff import SAMPLE_EFF  # noqa: E402
from study.experiments.sample_eff import run as run_sample_efficiency  # noqa: E402
from study.recipes import RECIPES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="64,128,256,512,1024", help="comma-separated n; 'fresh' for fresh data")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bases", type=Path, default=None, help="bases directory (default: <out>/bases)")
    ap.add_argument("--reuse", type=Path, default=None, help="a quick sample_eff stage directory to copy runs from")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scale", default="quick", choices=["quick", "micro"],
                    help="whose stage to widen: quick (the recorded sweep) or micro (seconds; the tests)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    sizes = [None if s == "fresh" else int(s) for s in a.sizes.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    cfg = {**SAMPLE_EFF[a.scale], "experiment": "E3", "sizes": sizes, "seeds": seeds}
    runs = a.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    if a.reuse:
        for d in sorted(a.reuse.glob("prefix-*")):
            if (d / "metrics.json").exists() and not (runs / d.name).exists():
                shutil.copytree(d, runs / d.name)
    t0 = time.time()

    def progress(step, total, info):
        if step == total:
            print(f"[{time.time() - t0:7.0f} s] {step}/{total} {info}", flush=True)

    res = run_sample_efficiency(runs, a.bases or a.out / "bases", RECIPES[a.scale]["E3"], cfg, progress=progress)
    res["wall_s"] = round(time.time() - t0)
    (a.out / "result.json").write_text(json.dumps(res, indent=1))
    for v in res["acc"]:
        row = "  ".join(f"n={n}: {res['acc'][v][n]['mean'] * 100:5.1f}% [{min(res['acc'][v][n]['values']) * 100:.0f}-"
                        f"{max(res['acc'][v][n]['values']) * 100:.0f}] loss {res['test_loss'][v][n]['mean']:.3f}"
                        for n in res["sizes"])
        print(f"{v:8s} {row}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
