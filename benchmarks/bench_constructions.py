"""Time [P]'s single-virtual-token constructions (docs/papers.md §5): the Theorem 1 check of 1,000
random targets (V=94, N=20, greedy generation; target <= 10 s) and the Theorem 2 check of random
maps, each --runs times. Prints one JSON object: median/min/max seconds and the verdicts.

    .venv/bin/python benchmarks/bench_constructions.py [--runs K] [--threads T] [--targets N] [--maps M]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from theory.constructions import min_beta, thm1_check, thm2_check  # noqa: E402


def stats(seconds: list[float]) -> dict:
    return {"median": round(statistics.median(seconds), 4), "min": round(min(seconds), 4),
            "max": round(max(seconds), 4), "all": [round(s, 4) for s in seconds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", type=int, default=1000, help="Theorem 1 targets per run")
    parser.add_argument("--maps", type=int, default=100, help="Theorem 2 random maps per run (V=94)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    V, N = 94, 20
    thm1_wall, thm1_gen, thm2_wall, beta_wall = [], [], [], []
    for run in range(args.runs):
        t0 = time.perf_counter()
        r1 = thm1_check(V, N, n_targets=args.targets, seed=run, search_beta=False)
        thm1_wall.append(time.perf_counter() - t0)
        thm1_gen.append(r1.seconds)
        t0 = time.perf_counter()
        r2 = thm2_check(V, n_maps=args.maps, seed=run)
        thm2_wall.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mb = min_beta(V, N, n_targets=args.targets, seed=run)
        beta_wall.append(time.perf_counter() - t0)
    print(json.dumps({
        "runs": args.runs, "threads": args.threads,
        "thm1": {"V": V, "N": N, "n_targets": args.targets, "all_exact": r1.n_success == r1.n_targets,
                 "seconds_total": stats(thm1_wall), "seconds_generation": stats(thm1_gen)},
        "thm1_min_beta_search": {"min_beta_last_run": mb, "seconds": stats(beta_wall)},
        "thm2": {"V": V, "n_maps": args.maps, "all_exact": r2.n_exact_maps == r2.n_maps,
                 "seconds_total": stats(thm2_wall)},
    }, indent=1))


if __name__ == "__main__":
    main()
