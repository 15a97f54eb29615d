"""Honest stage times: a stage's work (seconds it computed) apart from its wall time (seconds
from its start to its end, which in a parallel study include the time its groups of runs waited
for a core), and what they say about a whole study: its wall time against the sum of its stages'
work and against its longest chain (docs/benchmarks.md, "The study's wall time")."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class StageClock:
    """Times one stage as it runs. A parallel study's group runner (`engine.parallel`) adds the
    stage's groups (their own compute) and the time the stage spent away waiting for them. Each
    hand-over of groups is a phase (a stage may train a grid first and then the runs it chose):
    the groups of one phase run side by side, the phases one after another."""
    threads: int = 1
    started: float = 0.0  # epoch seconds, for the study's timeline
    t0: float = 0.0
    wall_s: float = 0.0
    away_s: float = 0.0  # the stage's process idle, its groups training elsewhere
    waited_s: float = 0.0  # of which spent waiting for a core
    groups: list = field(default_factory=list)  # [(seconds, threads, phase), ...] (phase 0 if left out)
    phase: int = 0  # the next hand-over's phase

    def start(self) -> "StageClock":
        self.started, self.t0 = time.time(), time.perf_counter()
        return self

    def stop(self) -> "StageClock":
        self.wall_s = time.perf_counter() - self.t0
        return self

    def to_json(self) -> dict:
        own = max(0.0, self.wall_s - self.away_s)
        phases: dict[int, list[float]] = {}
        for g in self.groups:
            phases.setdefault(g[2] if len(g) > 2 else 0, []).append(g[0])
        return {"wall_s": self.wall_s, "work_s": own + sum(map(sum, phases.values())),
                # its critical path: a phase's groups side by side, the phases one after another
                "span_s": own + sum(map(max, phases.values())),
                "phases": [phases[p] for p in sorted(phases)],
                "core_s": own * self.threads + sum(g[0] * g[1] for g in self.groups),
                "waited_s": self.waited_s, "threads": self.threads, "groups": len(self.groups),
                "started": self.started, "ended": self.started + self.wall_s}


def longest_chain(spans: dict[str, float], needs: dict[str, tuple]) -> tuple[float, list[str]]:
    """The longest path through the stage graph, each stage weighing `spans[name]` (stages not
    in `spans`, e.g. cached ones, weigh nothing); returns its length and its stages in order."""
    best: dict[str, tuple[float, list[str]]] = {}

    def chain(n: str) -> tuple[float, list[str]]:
        if n not in best:
            up = max((chain(u) for u in needs.get(n, ()) if u in needs), default=(0.0, []), key=lambda c: c[0])
            best[n] = (up[0] + spans.get(n, 0.0), up[1] + [n])
        return best[n]
    return max((chain(n) for n in needs), default=(0.0, []), key=lambda c: c[0])


def study_timing(records: dict, needs: dict[str, tuple], wall_s: float, cores: int) -> dict:
    """A study's speed, read from its own records: wall time, the sum of its stages' work, its
    longest chain, and the lower bound max(work / cores, chain) that perfect packing would reach."""
    timed = {n: r["timing"] for n, r in records.items() if not r.get("cached") and isinstance(r.get("timing"), dict)}
    work = sum(t["work_s"] for t in timed.values())
    chain_s, chain = longest_chain({n: t["span_s"] for n, t in timed.items()},
                                   {n: tuple(needs.get(n, ())) for n in records})
    bound = max(work / max(1, cores), chain_s)
    return {"wall_s": wall_s, "work_s": work, "core_s": sum(t["core_s"] for t in timed.values()),
            "longest_chain_s": chain_s, "longest_chain": chain if chain_s > 0 else [], "cores": cores,
            "bound_s": bound, "of_bound": bound / wall_s if wall_s > 0 else None,
            "stages_run": len(timed), "stages_cached": sum(1 for r in records.values() if r.get("cached"))}
