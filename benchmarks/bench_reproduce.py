"""`reproduce` timed, stage by stage, in a fresh study directory: with `--workers 1,2` the same
preset runs once sequentially and once on a local Ray with 2 workers, one after the other, and
the wall-time ratio is printed (target: >= 1.5x on 2 cores for the quick preset).
Each study's own timing (report.json: wall time, the sum of its stages' work, its longest chain,
and the bound max(work / workers, chain) that perfect packing would reach) is printed beside it.
--simulate replays a study's graph under the broker (`engine.schedule.simulate`, critical path
first, one slot per piece) for 1, 2, 4, 8 and 16 workers, and prints the wall times as JSON:
- `--simulate COSTS.json` ({stage: one-thread seconds}): stages as the unit, and Ray's first-come
  order beside it;
- `--simulate STUDY_DIR` (a finished study: its timings.json, stage records and run directories):
  three units side by side, a whole stage, a fused group of runs as recorded, and a single run,
  with the longest chain of each (`study_units` says how the costs are read).
--eta-replay STUDY_DIR replays a finished study's timeline (its stages' starts and ends, its runs'
ends) through the study line's ETA (`engine.progress.StudyEta`) and prints the ETA beside the
time that was really left, at 10 %, 25 %, 50 %, 75 % and 90 % of its wall time: once from the
catalogue's static estimates (a fresh study: no timings.json), once from today's cost model on
the same configs, and once from its own timings.
--work-table BEFORE AFTER puts two finished studies' stage work side by side (timings.json), with
their totals and each stage's change."""

import argparse
import json
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

from common import machine, stats

from study.reproduce import reproduce


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--scale", "--preset", dest="preset", default="quick")  # --preset: a deprecated alias of --scale
    ap.add_argument("--workers", default="1", help="comma-separated worker counts, e.g. 1,2")
    ap.add_argument("--simulate", help="a JSON file {stage: one-thread seconds} or a finished study's directory: "
                                       "replay the schedule only")
    ap.add_argument("--eta-replay", help="a finished study's directory: replay its timeline through the study's ETA")
    ap.add_argument("--eta-workers", type=int, default=2, help="the workers the replayed study ran on")
    ap.add_argument("--work-table", nargs=2, metavar=("BEFORE", "AFTER"),
                    help="two finished studies' directories: each stage's one-thread work side by side")
    args = ap.parse_args()
    if args.work_table:
        return work_table(*map(Path, args.work_table))
    if args.eta_replay:
        return eta_replay(Path(args.eta_replay), args.eta_workers, args.preset)
    if args.simulate:
        return simulate_only(args.preset, Path(args.simulate))
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


WORKERS = (1, 2, 4, 8, 16)


def simulate_only(preset: str, path: Path) -> None:
    from engine.schedule import simulate
    from engine.timing import longest_chain
    from study.stages import stages_for
    catalogue = {s.name: tuple(s.needs) for s in stages_for(preset, Path(tempfile.gettempdir()))}
    if path.is_dir():
        units, derived = study_units(path, catalogue)
    else:
        costs = json.loads(path.read_text())
        units, derived = {"stage": (costs, {n: catalogue.get(n, ()) for n in costs})}, {}
    out = {"source": str(path), "preset": preset, "how": derived, "by_unit": {}}
    for unit, (costs, needs) in units.items():
        work = sum(costs.values())
        chain_s, chain = longest_chain(costs, {n: needs.get(n, ()) for n in costs})
        row = {"units": len(costs), "work_s": work, "longest_chain_s": chain_s, "longest_chain": chain, "wall_s": {}}
        for w in WORKERS:
            row["wall_s"][str(w)] = {"critical_path_first_s": simulate(costs, needs, w, pinned=True)["wall_s"],
                                     "bound_s": max(work / w, chain_s)}
            if unit == "stage" and not path.is_dir():
                order = [n for n in catalogue if n in costs]
                row["wall_s"][str(w)]["first_come_s"] = simulate(costs, needs, w, order=order, pinned=True)["wall_s"]
        out["by_unit"][unit] = row
    print(json.dumps(out, indent=2))


def study_units(study: Path, catalogue: dict[str, tuple]) -> tuple[dict, dict]:
    """A finished study's graph three ways: {unit: (costs, needs)} for unit = stage, group, run.

    - stage: each stage's recorded work (its stage record's timing, else timings.json), one
      thread; its upstream stages from the catalogue (`study.stages`).
    - group: a stage's runs are its run directories (stages/<stage>/*/metrics.json). Their own
      times are in metrics.json (timing.train_seconds: the whole fused group's, the same for
      every member) and their start in provenance.json; runs that started together (within 5 s)
      with the same fused_runs are one group, which costs its longest member's train_seconds.
      What the stage spent beyond its groups (loading, choosing, collecting) is one piece after
      them, named after the stage, so the stages that need it wait for it. A base stage's run
      lives under bases/: its stage is its one piece.
    - run: every run of a group alone, at the group's time / its runs (fusing gains ~nothing on
      this CPU: docs/benchmarks.md, "ceiling for fusing").
    A stage's groups need its upstream stages. Where it trains in phases, a phase's groups need
    the previous phase's: recorded by the stage's timing ("phases", their group counts in order of
    start), or, for a record without them, a stage whose result names a learning-rate grid
    (sample_eff) trains its grid first, the runs at its first size and first seed."""
    history = json.loads((study / "timings.json").read_text()) if (study / "timings.json").is_file() else {}
    records = _stage_records(study, history)
    units = {"stage": ({}, {}), "group": ({}, {}), "run": ({}, {})}
    for name, (d, rec) in records.items():
        needs = tuple(u for u in catalogue.get(name, ()) if u in records)
        work = float((rec.get("timing") or {}).get("work_s", history.get(name, {}).get("work_s", 0.0)))
        units["stage"][0][name], units["stage"][1][name] = work, needs
        phases = _phases(d, rec)
        for unit in ("group", "run"):
            costs, deps = units[unit]
            prev, spent = needs, 0.0
            for k, groups in enumerate(phases):
                ids = []
                for g, (cost, runs) in enumerate(groups):
                    pieces = [(f"{name}/p{k}g{g}", cost)] if unit == "group" else \
                             [(f"{name}/{r}", cost / len(runs)) for r in runs]
                    for pid, c in pieces:
                        costs[pid], deps[pid] = c, prev
                        ids.append(pid)
                    spent += cost
                prev = tuple(ids)
            costs[name], deps[name] = max(0.0, work - spent), prev
    derived = {"runs": sum(len(r) for d, rec in records.values() for p in _phases(d, rec) for _, r in p),
               "stages": len(records), "from": "metrics.json timing.train_seconds per fused group, provenance.json "
               "started; a group's time split evenly among its runs; the rest of a stage's work after its runs"}
    return units, derived


def _stage_records(study: Path, history: dict) -> dict[str, tuple[Path, dict]]:
    """Each stage's directory and record: the one under timings.json's key, else the latest."""
    out: dict[str, tuple[Path, dict]] = {}
    for marker in sorted((study / "stages").glob("*/result.json")):
        rec = json.loads(marker.read_text())
        name = rec.get("name")
        if rec.get("status") != "done" or not name:
            continue
        mine = history.get(name, {}).get("key") == rec.get("key")
        later = (rec.get("timing") or {}).get("ended", 0) > (out.get(name, (None, {}))[1].get("timing") or {}).get("ended", 0)
        if name not in out or mine or (later and history.get(name, {}).get("key") != out[name][1].get("key")):
            out[name] = (marker.parent, rec)
    return out


def _phases(d: Path, rec: dict) -> list[list[tuple[float, list[str]]]]:
    """A stage's groups of runs in phases: [[(seconds, [run name, ...]), ...], ...]."""
    runs = []
    for m in sorted(d.glob("*/metrics.json")):
        t = json.loads(m.read_text()).get("timing") or {}
        prov = json.loads((m.parent / "provenance.json").read_text())
        cfg = json.loads((m.parent / "config.json").read_text())
        start = datetime.strptime(prov["started"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
        runs.append((start, m.parent.name, int(t.get("fused_runs", 1)), float(t.get("train_seconds", 0.0)), cfg))
    groups: list[dict] = []
    for start, name, k, secs, cfg in sorted(runs, key=lambda r: (r[0], r[1])):
        g = next((g for g in groups if g["k"] == k and abs(g["start"] - start) <= 5 and len(g["runs"]) < k), None)
        if g is None:
            g = {"start": start, "k": k, "s": 0.0, "runs": [], "cfgs": []}
            groups.append(g)
        g["s"], g["runs"], g["cfgs"] = max(g["s"], secs), g["runs"] + [name], g["cfgs"] + [cfg]
    counts = (rec.get("timing") or {}).get("phases")
    if counts:
        sizes = [len(p) for p in counts]
    else:
        res = rec.get("result") or {}
        first = lambda c: str((c.get("train") or {}).get("train_size")) == str(res["sizes"][0]) \
            and c.get("seed") == res["seeds"][0]  # noqa: E731
        grid = [g for g in groups if res.get("lr_grid") and all(first(c) for c in g["cfgs"])]
        sizes = [len(grid), len(groups) - len(grid)] if grid else [len(groups)]
        groups = grid + [g for g in groups if g not in grid]
    phases, at = [], 0
    for n in sizes:
        phases.append([(g["s"], g["runs"]) for g in groups[at:at + n]])
        at += n
    return [p for p in phases if p]


def work_table(before: Path, after: Path) -> None:
    """Each stage's work (s, one thread) in two finished studies, from their timings.json: a stage
    the other study lacks (or whose key changed, so it was trained again) shows as such."""
    a, b = (json.loads((d / "timings.json").read_text()) for d in (before, after))
    rows = {}
    for name in sorted(set(a) | set(b), key=lambda n: -max(a.get(n, {}).get("work_s", 0), b.get(n, {}).get("work_s", 0))):
        x, y = a.get(name, {}).get("work_s"), b.get(name, {}).get("work_s")
        rows[name] = {"before_s": x, "after_s": y, "same_key": a.get(name, {}).get("key") == b.get(name, {}).get("key"),
                      "change": (y / x - 1) if x and y else None}
    total = lambda t: sum(v.get("work_s", 0) for v in t.values())  # noqa: E731
    print(json.dumps({"before": str(before), "after": str(after), "stages": rows,
                      "total_before_s": total(a), "total_after_s": total(b),
                      "total_change": total(b) / total(a) - 1}, indent=2))


def eta_replay(study: Path, workers: int, preset: str) -> None:
    """What the study line would have said (module docstring). The replay sees a run only when it
    ends (no step progress), so between run ends its ETA stands still where the live line moves."""
    from engine.progress import StudyEta
    from study.stages import stages_for
    catalogue = {s.name: tuple(s.needs) for s in stages_for(preset, Path(tempfile.gettempdir()))}
    history = json.loads((study / "timings.json").read_text())
    records = _stage_records(study, history)
    needs = {n: tuple(u for u in catalogue.get(n, ()) if u in records) for n in records}
    events = []
    for name, (d, rec) in records.items():
        t = rec["timing"]
        events += [(t["started"], 0, "start", name), (t["ended"], 2, "done", name)]
        ends = sorted(datetime.strptime(json.loads((m.parent / "provenance.json").read_text())["started"],
                                        "%Y-%m-%dT%H:%M:%S%z").timestamp()
                      + json.loads(m.read_text())["timing"]["train_seconds"] for m in d.glob("*/metrics.json"))
        events += [(min(e, t["ended"]), 1, "runs", name, i + 1) for i, e in enumerate(ends)]
    events.sort()
    t0, t1 = events[0][0], max(e[0] for e in events)
    from study.stages import estimate
    static = {n: estimate(n, rec["config"]) for n, (_, rec) in records.items()}
    plans = {"estimates": [{"name": n, "needs": needs[n], "dir": None, "runs": None, "work_s": history[n]["estimate"],
                            "span_s": history[n]["estimate"]} for n in records],
             # the same study's configs under today's cost model (study.experiments.toy.step_seconds)
             "estimates_now": [{"name": n, "needs": needs[n], "dir": None, "runs": None, "work_s": static[n],
                                "span_s": static[n]} for n in records],
             "recorded": [{"name": n, "needs": needs[n], "dir": None, "work_s": history[n]["work_s"],
                           "span_s": history[n]["span_s"], "runs": len(list(d.glob("*/metrics.json")))}
                          for n, (d, _) in records.items()]}
    out = {"study": str(study), "wall_s": t1 - t0, "workers": workers, "by_plan": {}}
    for label, plan in plans.items():
        now = [t0]
        eta = StudyEta(plan, workers, clock=lambda: now[0])
        marks, trace = [0.1, 0.25, 0.5, 0.75, 0.9], {}
        for ev in events:
            while marks and ev[0] >= t0 + marks[0] * (t1 - t0):
                now[0] = t0 + marks[0] * (t1 - t0)
                trace[f"{marks.pop(0):.0%}"] = {"eta_s": eta.eta_s(), "left_s": t1 - now[0], "line": eta.line()}
            now[0] = ev[0]
            if ev[2] == "start":
                eta.start(ev[3])
            elif ev[2] == "runs":
                eta.runs(ev[3], ev[4])
            else:
                eta.done(ev[3], records[ev[3]][1], len(list(records[ev[3]][0].glob("*/metrics.json"))))
        out["by_plan"][label] = trace
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
