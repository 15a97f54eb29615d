"""`make bench`: every benchmark in turn; one JSON object (benchmark -> its JSON) on stdout.
Each benchmark quotes medians over several runs with min and max.

    python benchmarks/run_all.py [--only training,probes,...] [--quick]
--quick runs each benchmark once and skips the slowest parts (for a smoke check).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "cli": ["bench_cli.py"],
    "training": ["bench_training.py"],
    "fused": ["bench_fused.py"],
    "ceiling": ["bench_ceiling.py"],
    "threads": ["bench_threads.py"],
    "precision": ["bench_precision.py"],
    "e1": ["bench_e1.py"],
    "probes": ["bench_probes.py"],
    "report": ["bench_report.py"],
    "llama": ["bench_llama.py"],
    "reparam": ["bench_reparam.py"],
    "constructions": ["bench_constructions.py"],
    "reproduce": ["bench_reproduce.py"],
}
QUICK_ARGS = {"training": ["--runs", "1", "--skip-time-to-99", "--iters", "5", "--skip-avenues"],
              "fused": ["--runs", "1", "--steps", "4", "--sweep-steps", "4"], "e1": ["--runs", "1"], "ceiling": ["--runs", "1", "--steps", "4"], "threads": ["--steps", "10", "--skip-cost"], "precision": ["--runs", "1", "--steps", "3"], "probes": ["--runs", "1"],
              "reparam": ["--runs", "1"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(BENCHES)
    results = {}
    for name in names:
        script = HERE / BENCHES[name][0]
        if not script.exists():
            results[name] = {"skipped": f"{script.name} missing"}
            continue
        extra = QUICK_ARGS.get(name, []) if args.quick else []
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        p = subprocess.run([sys.executable, str(script), *extra], capture_output=True, text=True)
        try:
            results[name] = json.loads(p.stdout[p.stdout.index("{"):])
        except ValueError:
            results[name] = {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"],
                             "returncode": p.returncode}
        results[name]["bench_wall_s"] = time.perf_counter() - t
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
