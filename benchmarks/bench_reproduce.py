"""`reproduce` timed, stage by stage, in a fresh study directory: with `--workers 1,2` the same
preset runs once sequentially and once on a local Ray with 2 workers, one after the other, and
the wall-time ratio is printed (the issue's target: >= 1.5x on 2 cores for the quick preset)."""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import machine, stats

from study.reproduce import reproduce


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--workers", default="1", help="comma-separated worker counts, e.g. 1,2")
    args = ap.parse_args()
    out = {"machine": machine(), "preset": args.preset, "by_workers": {}}
    for w in [int(x) for x in args.workers.split(",")]:
        per_stage: dict[str, list[float]] = {}
        totals = []
        for _ in range(args.runs):
            d = Path(tempfile.mkdtemp())
            try:
                t = time.perf_counter()
                res = reproduce(d / "study", args.preset, workers=w)
                totals.append(time.perf_counter() - t)
                for n, r in res["records"].items():
                    per_stage.setdefault(n, []).append(r["seconds"])
            finally:
                shutil.rmtree(d)
        out["by_workers"][str(w)] = {"total_s": stats(totals), "stages_s": {n: stats(v) for n, v in per_stage.items()},
                                     "failed": [n for n, r in res["records"].items() if r["status"] != "done"]}
    ws = list(out["by_workers"])
    if len(ws) > 1:
        t = lambda w: out["by_workers"][w]["total_s"]["median"]
        out["speedup"] = {f"{ws[0]}->{w}": t(ws[0]) / t(w) for w in ws[1:]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
