"""Critical path first: which stage (or group of runs) gets the next free core, and how many.

Pure bookkeeping, no Ray and no torch: `engine.parallel` runs it in a Ray actor, the tests and
`benchmarks/bench_reproduce.py --simulate` drive it directly.

- Each stage's cost is its work time in a previous run of the same stage (out/timings.json), the
  same stage under another config scaled by the two configs' estimates, or else the catalogue's
  static estimate (`Stage.estimate`: steps x runs x a per-step cost).
- Its priority is the longest chain that starts with it (its cost plus its longest dependent
  chain), so base-E3 -> E4 starts first and never waits behind short stages.
- `study_plan` hands the same costs, with each stage's recorded run count, to the study's one
  ETA (`engine.progress.StudyEta`).
- `CoreBroker` grants cores (worker slots) to waiting tickets, highest priority first; the last
  ticket waiting takes every free slot (a stage that runs alone gets every core), unless the study
  pins its threads (then every grant is one slot, and a study's bits do not depend on its schedule).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
# Lazy import: toy_models.runs (it loads torch) only where a timing is written, so the scheduler and
# its tests import without torch. No cycle is hidden.

TOP = (math.inf, math.inf)  # a stage taking its core back after its groups: ahead of everything


def read_history(out: Path) -> dict:
    try:
        data = json.loads((Path(out) / "timings.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record_history(out: Path, name: str, key: str, estimate: float, timing: dict, runs: int | None = None) -> None:
    """Remember a stage's measured work (and how many runs it finished) for the next study's
    schedule and ETA (never part of a key)."""
    from toy_models.runs import write_json
    hist = read_history(out)
    hist[name] = {"key": key, "estimate": estimate, "work_s": timing["work_s"], "span_s": timing["span_s"]}
    if runs is not None:
        hist[name]["runs"] = runs
    write_json(Path(out) / "timings.json", hist)


def stage_cost(name: str, key: str, estimate: float, history: dict, field: str = "span_s") -> float:
    """Seconds the stage is expected to take on its critical path (module docstring); with
    field="work_s", the seconds it is expected to compute in all (its groups one after another)."""
    h = history.get(name)
    if isinstance(h, dict) and isinstance(h.get(field), (int, float)):
        if h.get("key") == key:
            return float(h[field])
        if h.get("estimate"):
            return float(h[field]) * estimate / float(h["estimate"])
    return estimate


def study_plan(stages: list, keys: dict[str, str], history: dict, dirs: dict[str, Path],
               cached: set[str] = frozenset()) -> list[dict]:
    """What a study's ETA starts from (`engine.progress.StudyEta`): each stage's expected work and
    span (`stage_cost`), the stages it needs, its run count as recorded for the same key (None:
    not known until it has run), its directory (where its runs' directories appear) and whether
    it is already cached (done before the study starts: no work left)."""
    out = []
    for s in stages:
        h = history.get(s.name)
        same = isinstance(h, dict) and h.get("key") == keys[s.name] and isinstance(h.get("runs"), int)
        out.append({"name": s.name, "needs": tuple(s.needs), "dir": dirs.get(s.name),
                    "work_s": stage_cost(s.name, keys[s.name], s.estimate, history, "work_s"),
                    "span_s": stage_cost(s.name, keys[s.name], s.estimate, history),
                    "runs": h["runs"] if same else None, "cached": s.name in cached})
    return out


def priorities(costs: dict[str, float], needs: dict[str, tuple]) -> dict[str, float]:
    """Each stage's longest chain of costs through the stages that depend on it (its bottom level)."""
    users: dict[str, list[str]] = {n: [] for n in costs}
    for n, ups in needs.items():
        for u in ups:
            users.setdefault(u, []).append(n)
    memo: dict[str, float] = {}

    def level(n: str) -> float:
        if n not in memo:
            memo[n] = costs.get(n, 0.0) + max((level(u) for u in users.get(n, ()) if u in costs), default=0.0)
        return memo[n]
    return {n: level(n) for n in costs}


class CoreBroker:
    """Worker slots granted to tickets by priority. request() queues tickets (id, priority, want:
    a slot count, or None to let the broker choose), release() frees a ticket's slots, drop(owner)
    forgets what a dead attempt of a stage held ("owner/..." tickets)."""

    def __init__(self, slots: int, pinned: bool):
        self.slots, self.pinned = slots, pinned
        self.free = slots
        self.waiting: list[tuple[tuple, int, str, int | None]] = []  # (-priority, seq, id, want)
        self.held: dict[str, int] = {}
        self.grants: dict[str, int] = {}  # granted and not yet collected by wait()
        self.seq = 0

    def request(self, tickets: list, release: list | tuple = ()) -> list[str]:
        """Release `release`, queue `tickets` [(id, priority, want)], grant; returns the ids granted now."""
        for t in release:
            self._free(t)
        for tid, prio, want in tickets:
            prio = tuple(prio) if isinstance(prio, (list, tuple)) else (prio,)
            self.waiting.append((tuple(-p for p in prio), self.seq, tid, want))
            self.seq += 1
        return self._grant()

    def release(self, tickets: list | tuple) -> list[str]:
        return self.request([], tickets)

    def drop(self, owner: str) -> list[str]:
        mine = lambda t: t.startswith(owner + "/")  # noqa: E731
        self.waiting = [w for w in self.waiting if not mine(w[2])]
        for t in [t for t in self.held if mine(t)]:
            self._free(t)
        return self._grant()

    def _free(self, ticket: str) -> None:
        self.free += self.held.pop(ticket, 0)
        self.grants.pop(ticket, None)

    def _grant(self) -> list[str]:
        self.waiting.sort()
        granted = []
        while self.waiting and self.free > 0:
            _, _, tid, want = self.waiting[0]
            n = 1 if self.pinned else (want or (self.free if len(self.waiting) == 1 else 1))
            if n > self.free:
                break  # a ticket that wants more slots waits for them; nothing overtakes it
            self.waiting.pop(0)
            self.free -= n
            self.held[tid] = self.grants[tid] = n
            granted.append(tid)
        return granted


def simulate(costs: dict[str, float], needs: dict[str, tuple], slots: int, order: list[str] | None = None,
             pinned: bool = False, speedup=lambda n: n ** 0.8) -> dict:
    """The wall time of a study whose stages take `costs` seconds at one slot (n slots: cost /
    speedup(n)), under the broker: by critical-path priority, or with `order` by that order (first
    come, first served, as Ray's own queue). Returns the wall time and each stage's (start, end, slots)."""
    prio = priorities(costs, needs) if order is None else {n: -i for i, n in enumerate(order)}
    broker, t, done, running, log = CoreBroker(slots, pinned), 0.0, set(), {}, {}
    requested: set[str] = set()
    release: list[str] = []
    while len(done) < len(costs):
        ready = [n for n in costs if n not in requested and all(u in done for u in needs.get(n, ()) if u in costs)]
        requested.update(ready)
        for n in broker.request([(n, prio[n], None) for n in ready], release):
            k = broker.grants.pop(n)
            running[n] = t + costs[n] / speedup(k)
            log[n] = (t, running[n], k)
        release = []
        t, n = min((end, n) for n, end in running.items())
        del running[n]
        done.add(n)
        release.append(n)
    return {"wall_s": t, "stages": log}
