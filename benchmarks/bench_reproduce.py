"""`reproduce` timed, stage by stage, in a fresh study directory: with `--workers 1,2` the same
preset runs once sequentially and once on a local Ray with 2 workers, one after the other, and
the wall-time ratio is printed (target: >= 1.5x on 2 cores for the quick preset).
Each study's own timing (report.json: wall time, the sum of its stages' work, its longest chain,
and the bound max(work / workers, chain) that perfect packing would reach) is printed beside it.
--simulate COSTS.json replays a study's stage graph with the given one-thread stage times under
the broker (`study.schedule.simulate`): critical path first against Ray's first-come order."""

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
    ap.add_argument("--scale", "--preset", dest="preset", default="quick")  # --preset: a deprecated alias of --scale
    ap.add_argument("--workers", default="1", help="comma-separated worker counts, e.g. 1,2")
    ap.add_argument("--simulate", help="a JSON file {stage: one-thread seconds}: replay the schedule only")
    args = ap.parse_args()
    if args.simulate:
        return simulate_only(args.preset, json.loads(Path(args.simulate).read_text()))
    out = {"machine": machine(), "preset": args.preset, "by_workers": {}}
    for w in [int(x) for x in args.workers.split(",")]:
        per_stage: dict[str, list[float]] = {}
        totals, timings = [], []
        for _ in range(args.runs):
            d = Path(tempfile.mkdtemp())
            try:
                t = time.perf_counter()
                res = reproduce(d / "study", args.preset, workers=w)
                totals.append(time.perf_counter() - t)
                timings.append(res["timing"])
                for n, r in res["records"].items():
                    per_stage.setdefault(n, []).append(r["timing"]["work_s"])
            finally:
                shutil.rmtree(d)
        out["by_workers"][str(w)] = {"total_s": stats(totals), "stages_work_s": {n: stats(v) for n, v in per_stage.items()},
                                     **{k: stats([t[k] for t in timings]) for k in ("wall_s", "work_s", "longest_chain_s",
                                                                                    "bound_s", "of_bound")},
                                     "longest_chain": timings[-1]["longest_chain"],
                                     "failed": [n for n, r in res["records"].items() if r["status"] != "done"]}
    ws = list(out["by_workers"])
    if len(ws) > 1:
        t = lambda w: out["by_workers"][w]["total_s"]["median"]
        out["speedup"] = {f"{ws[0]}->{w}": t(ws[0]) / t(w) for w in ws[1:]}
    print(json.dumps(out, indent=2))


def simulate_only(preset: str, costs: dict) -> None:
    from study.schedule import simulate
    from study.stages import stages_for
    stages = [s for s in stages_for(preset, Path(tempfile.gettempdir())) if s.name in costs]
    needs = {s.name: s.needs for s in stages}
    out = {"work_s": sum(costs.values())}
    for slots in (1, 2):
        crit = simulate(costs, needs, slots)
        fifo = simulate(costs, needs, slots, order=[s.name for s in stages], pinned=True)
        out[f"{slots} worker(s)"] = {"critical_path_first_s": crit["wall_s"], "first_come_s": fifo["wall_s"],
                                     "order": sorted(crit["stages"], key=lambda n: crit["stages"][n][0])}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
