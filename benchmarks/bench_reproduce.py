"""Each stage of `reproduce --preset quick`, timed (fresh study directory; one run by default,
since the whole study is the <= 10 minute target)."""

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
    args = ap.parse_args()
    per_stage: dict[str, list[float]] = {}
    totals = []
    for _ in range(args.runs):
        d = Path(tempfile.mkdtemp())
        try:
            t = time.perf_counter()
            res = reproduce(d / "study", args.preset)
            totals.append(time.perf_counter() - t)
            for n, r in res["records"].items():
                per_stage.setdefault(n, []).append(r["seconds"])
        finally:
            shutil.rmtree(d)
    print(json.dumps({"machine": machine(), "preset": args.preset, "total_s": {**stats(totals), "target_s": 600},
                      "stages_s": {n: stats(v) for n, v in per_stage.items()},
                      "failed": [n for n, r in res["records"].items() if r["status"] != "done"]}, indent=2))


if __name__ == "__main__":
    main()
