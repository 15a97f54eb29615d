"""E1 end to end on the quick recipe: pretrain on ascending, then full / LoRA / soft prompt /
three prefixes on descending (target <= 4 minutes on 2 CPU cores).

    python benchmarks/bench_e1.py [--runs 3]
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import machine, stats

from study.experiments.e1 import run as run_e1
from study.recipes import RECIPES


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    times, res = [], None
    for _ in range(args.runs):
        d = Path(tempfile.mkdtemp())
        try:
            t = time.perf_counter()
            res = run_e1(d / "e1", d / "bases", RECIPES["quick"]["E1"], {})
            times.append(time.perf_counter() - t)
        finally:
            shutil.rmtree(d)
    print(json.dumps({"machine": machine(), "e1_end_to_end_s": {**stats(times), "target_s": 240},
                      "descending_acc": {k: v["mean"] for k, v in res["descending_acc"].items()}}, indent=2))


if __name__ == "__main__":
    main()
