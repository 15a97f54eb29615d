"""Time the reparameterization study (docs/papers.md §6): the quick preset 3 times, or with --full the
full preset (default once). Prints one JSON object: median/min/max seconds and the measured slopes.

    .venv/bin/python benchmarks/bench_reparam.py [--full] [--runs K] [--threads T] [--save PATH]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from theory.reparam import ReparamConfig, run_reparam_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full study instead of quick")
    parser.add_argument("--runs", type=int, default=None, help="repeats (quick: 3, full: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (config: 1)")
    parser.add_argument("--save", type=Path, default=None, help="write the last result's JSON")
    args = parser.parse_args()
    overrides = {} if args.threads is None else {"threads": args.threads}
    cfg = ReparamConfig.full(**overrides) if args.full else ReparamConfig.quick(**overrides)
    runs = args.runs or (1 if args.full else 3)
    seconds, result = [], None
    for _ in range(runs):
        result = run_reparam_study(cfg)
        seconds.append(result.total_seconds)
    if args.save is not None:
        args.save.write_text(json.dumps(result.to_json()))
    print(json.dumps({
        "preset": "full" if args.full else "quick", "runs": runs, "threads": cfg.threads,
        "seconds": {"median": statistics.median(seconds), "min": min(seconds),
                    "max": max(seconds), "all": seconds},
        "fit_seconds_last_run": result.fit_seconds,
        "slopes": {m: {k: {q: round(v, 4) for q, v in s.items()} for k, s in by.items()}
                   for m, by in result.slopes.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
