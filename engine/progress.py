"""Progress of a running study: each stage's step, loss and an ETA, so that nobody wonders
whether a 15-minute stage is alive.

The training loop calls progress(step, total, info) at every step (`toy_models.training`);
`with_eta` adds the rate and the ETA of the current group of runs to `info`. In a parallel
study each piece (a stage task, a group of runs) writes its state to a small file in its stage's
directory (`ProgressFile`, at most every few seconds), which the driver reads (`read_progress`),
so it works the same on a Ray cluster whose `out` every node sees. `StudyProgress` shows it:
rich bars on a terminal, one line a minute per stage otherwise. It writes to the stream it is
given (the CLI gives stderr).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from engine.timing import longest_chain
from toy_models.runs import write_text
# Lazy import: rich, only when the display is a terminal (a log file gets plain lines).

WRITE_EVERY_S = 2.0
LINE_EVERY_S = 60.0
RUNS_EVERY_S = 2.0  # how often a running stage's finished runs are counted
STUDY_GAP_S = 5.0  # the least time between two study lines for finished runs (a finished stage always gets one)
PRIOR = 0.1  # the weight of the expected costs against the measured ones, as a share of the study's work


def with_eta(progress, clock=time.monotonic):
    """Wrap a progress callback: info gains rate (steps/s) and eta_s, measured from the first
    step this group of runs reported (a resumed group starts past 0; a new group restarts), unless
    it has an eta_s already."""
    state = {"step0": None, "t0": 0.0, "last": -1, "total": None}

    def prog(step: int, total: int, info: dict) -> None:
        now = clock()
        if state["step0"] is None or step < state["last"] or total != state["total"]:
            state.update(step0=step, t0=now, total=total)
        state["last"] = step
        info = dict(info)
        dt, ds = now - state["t0"], step - state["step0"]
        if dt > 0 and ds > 0 and "eta_s" not in info:  # a source that knows its ETA keeps it
            info["rate"] = ds / dt
            info["eta_s"] = (total - step) / info["rate"]
        if progress:
            progress(step, total, info)
    return prog


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def describe(step: int, total: int, info: dict) -> str:
    """One line of a stage's state: step/total, loss, accuracy, ETA, groups and threads."""
    parts = [f"step {step:,}/{total:,}"]
    if isinstance(info.get("loss"), (int, float)):
        parts.append(f"loss {info['loss']:.4f}")
    if isinstance(info.get("acc"), (int, float)):
        parts.append(f"acc {100 * info['acc']:.1f} %")
    if "eta_s" in info:
        parts.append(f"ETA {_fmt_s(info['eta_s'])}")
    if info.get("pieces", 1) > 1:
        parts.append(f"{info['pieces']} groups")
    if info.get("threads"):
        parts.append(f"{info['threads']} thread{'s' if info['threads'] > 1 else ''}")
    return ", ".join(parts)


class ProgressFile:
    """A piece's progress callback that writes its latest state to `path` (atomically, at most
    every WRITE_EVERY_S seconds, and once more, marked done, when the piece ends)."""

    def __init__(self, path: Path, threads: int, clock=time.monotonic):
        self.path, self.threads, self.clock = Path(path), threads, clock
        self.last_write = -1e18
        self.state: dict | None = None
        self.cb = with_eta(self._record, clock)

    def __enter__(self):
        return self.cb

    def __exit__(self, *exc):
        if self.state is not None:
            self.state["done"] = True
            self._write()

    def _record(self, step: int, total: int, info: dict) -> None:
        self.state = {"step": step, "total": total, "threads": self.threads, "t": time.time(),
                      "info": {k: v for k, v in info.items() if isinstance(v, (int, float, str))}}
        if self.clock() - self.last_write >= WRITE_EVERY_S or step >= total:
            self._write()

    def _write(self) -> None:
        self.last_write = self.clock()
        try:
            write_text(self.path, json.dumps(self.state))  # atomic: the driver never reads half a file
        except OSError:  # progress is a courtesy: a full disk is the stage's own writes' to report
            pass


def read_progress(directory: Path) -> dict | None:
    """The running pieces of one stage, summed: steps, totals, threads; mean loss; the longest ETA."""
    live = []
    for p in sorted(Path(directory).glob("*.json")):
        try:
            s = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(s, dict) and not s.get("done"):
            live.append(s)
    if not live:
        return None
    info: dict = {"pieces": len(live), "threads": sum(s.get("threads", 1) for s in live),
                  "runs": sum(s["info"].get("runs", 1) for s in live)}
    losses = [s["info"]["loss"] for s in live if isinstance(s["info"].get("loss"), (int, float))]
    if losses:
        info["loss"] = sum(losses) / len(losses)
    etas = [s["info"]["eta_s"] for s in live if "eta_s" in s["info"]]
    if etas:
        info["eta_s"] = max(etas)
    return {"step": sum(s["step"] for s in live), "total": sum(s["total"] for s in live), "info": info}


def finished_runs(directory: Path | None) -> int:
    """How many of a stage's runs are complete: its run directories that hold metrics.json (a
    run's last file, `toy_models.runs`)."""
    if directory is None:
        return 0
    try:
        return sum(1 for _ in Path(directory).glob("*/metrics.json"))
    except OSError:
        return 0


class StudyEta:
    """The whole study's state and one ETA for it. plan: `engine.schedule.study_plan` (each stage's
    expected work and span in seconds, the stages it needs, its run count or None, its directory);
    workers: the slots its stages share.

    A stage's part done is its finished runs plus the running ones' share of their steps, over
    its run count; with no run count (a stage that has not run under this key, or one without
    runs), the time it has run over the time it is expected to take, at most 90 %. The ETA is
    max(remaining work / workers, the longest chain of remaining spans), times a factor learnt
    from the stages finished so far (measured / expected work, weighed against a prior of PRIOR x
    the study's expected work, so that one short stage does not swing it)."""

    def __init__(self, plan: list[dict], workers: int = 1, clock=time.monotonic, prior: float = PRIOR):
        self.workers, self.clock = max(1, workers), clock
        self.stages = {p["name"]: {**p, "state": "pending", "done_runs": 0, "live": 0.0, "t0": None,
                                   "f0": 0.0, "actual": None} for p in plan}
        for s in self.stages.values():  # found cached before the study started: done, no work left
            if s.get("cached"):
                n = s["runs"] if s["runs"] is not None else finished_runs(s["dir"])
                s.update(state="done", done_runs=n, runs=n)
        self.prior = prior * sum(p["work_s"] for p in plan)
        self.t_start = clock()

    def start(self, name: str, runs_done: int = 0) -> None:
        """A stage starts, `runs_done` of its runs already complete (a resumed stage's)."""
        s = self.stages.get(name)
        if s is None or s["state"] == "done":
            return
        s.update(state="running", t0=self.clock(), done_runs=max(s["done_runs"], runs_done))
        s["f0"] = self._fraction(s, 1.0, s["t0"])

    def step(self, name: str, step: int, total: int, info: dict) -> None:
        """A running stage's latest step of its running runs (info["runs"]: how many, default 1)."""
        s = self.stages.get(name)
        if s is not None and s["state"] == "running" and total > 0:
            s["live"] = info.get("runs", 1) * min(step, total) / total

    def runs(self, name: str, n: int) -> bool:
        """`n` of the stage's runs are complete; True if that is more than before."""
        s = self.stages.get(name)
        if s is None or n <= s["done_runs"]:
            return False
        s["done_runs"], s["live"] = n, 0.0  # the runs that just ended were the live ones
        return True

    def done(self, name: str, rec: dict, runs: int) -> None:
        """A stage ended (or was found cached) with `runs` complete runs: now its run count."""
        s = self.stages.get(name)
        if s is None:
            return
        s.update(state="done", done_runs=runs, runs=runs, live=0.0)
        work = (rec.get("timing") or {}).get("work_s")
        if not rec.get("cached") and isinstance(work, (int, float)):
            s["actual"] = (float(work), s["work_s"] * (1.0 - s["f0"]))

    def factor(self) -> float:
        """Measured over expected work of the stages finished so far, shrunk towards 1."""
        measured = [a for a in (s["actual"] for s in self.stages.values()) if a]
        a, e = sum(m for m, _ in measured), sum(x for _, x in measured)
        return (a + self.prior) / (e + self.prior) if e + self.prior > 0 else 1.0

    def _fraction(self, s: dict, k: float, now: float) -> float:
        if s["state"] == "done":
            return 1.0
        if s["runs"]:
            return min(1.0, (s["done_runs"] + s["live"]) / s["runs"])
        if s["state"] == "running":
            expected = k * (s["work_s"] if self.workers == 1 else s["span_s"])
            return min(0.9, (now - s["t0"]) / expected) if expected > 0 else 0.9
        return 0.0

    def eta_s(self) -> float:
        """Seconds until the study ends, by the module's rule."""
        k, now = self.factor(), self.clock()
        left = {n: 1.0 - self._fraction(s, k, now) for n, s in self.stages.items()}
        work = sum(s["work_s"] * left[n] for n, s in self.stages.items())
        chain, _ = longest_chain({n: s["span_s"] * left[n] for n, s in self.stages.items()},
                                 {n: tuple(u for u in s["needs"] if u in self.stages) for n, s in self.stages.items()})
        return k * max(work / self.workers, chain)

    def line(self) -> str:
        """`[study] 5/14 stages, 37/120 runs, 21m04s elapsed, ETA 41m00s` ("120+" or "?": some
        stages' run counts are known only once they have run)."""
        st = self.stages.values()
        done = sum(s["state"] == "done" for s in st)
        runs = sum(s["done_runs"] for s in st)
        total = sum(s["runs"] if s["runs"] is not None else s["done_runs"] for s in st)
        more = any(s["runs"] is None for s in st)
        of = "?" if more and not total else f"{total}+" if more else f"{total}"
        return (f"[study] {done}/{len(self.stages)} stages, {runs}/{of} runs, "
                f"{_fmt_s(self.clock() - self.t_start)} elapsed, ETA {_fmt_s(self.eta_s())}")


class _Factory:
    """`StudyProgress.factory`: called as a stage starts, it returns the stage's progress callback;
    `plan`, which the driver calls once before any stage runs or is found cached, gives it the
    study's plan (`engine.schedule.study_plan`) for the study line."""

    def __init__(self, sp: "StudyProgress"):
        self.sp = sp

    def __call__(self, i: int, n: int, stage):
        return self.sp._stage(i, n, stage)

    def plan(self, plan: list[dict], workers: int) -> None:
        self.sp.study = StudyEta(plan, workers, self.sp.clock)
        if self.sp.bar is not None:  # the study's bar above the stages' bars
            self.sp._study_line()


class StudyProgress:
    """The study's display: on a terminal, one rich bar per running stage (step/total, loss, ETA)
    under one for the whole study; otherwise a line when a stage starts, one a minute while it
    runs, and one when it ends with its work and wall times. Beside them, the study line
    (`StudyEta.line`: stages and runs done of all, one ETA): when the first stage starts, when a
    stage ends, when runs finish (at most one line every STUDY_GAP_S) and otherwise once every
    `every_s` while stages run. Use `factory` as reproduce's progress_factory and `done` as on_done."""

    def __init__(self, file=None, tty: bool | None = None, every_s: float = LINE_EVERY_S, clock=time.monotonic):
        self.file = file or sys.stderr
        self.tty = self.file.isatty() if tty is None else tty
        self.every_s, self.clock = every_s, clock
        self.bar = None
        self.tasks: dict[str, object] = {}
        self.factory = _Factory(self)
        self.study: StudyEta | None = None
        self.last_study, self.pending = -math.inf, False
        self.polled: dict[str, float] = {}

    def __enter__(self):
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                console=Console(file=self.file))
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.pending and self.study is not None:  # e.g. a study found whole in its cache
            self._study_line()
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, file=self.file, flush=True)

    def _study_line(self) -> None:
        self.last_study, self.pending = self.clock(), False
        line = self.study.line()
        if self.bar is None:
            self._line(line)
            return
        done = sum(s["state"] == "done" for s in self.study.stages.values())
        if "study" not in self.tasks:
            self.tasks["study"] = self.bar.add_task("study", total=len(self.study.stages), info="")
        self.bar.update(self.tasks["study"], completed=done, info=line.removeprefix("[study] "))

    def _tick(self, name: str, step: int, total: int, info: dict) -> None:
        """A running stage's step: count its finished runs now and then, and show the study line
        when runs have finished (at most every STUDY_GAP_S) or every `every_s`."""
        if self.study is None or name not in self.study.stages:
            return
        self.study.step(name, step, total, info)
        now = self.clock()
        if now - self.polled.get(name, -math.inf) >= RUNS_EVERY_S:
            self.polled[name] = now
            self.pending |= self.study.runs(name, finished_runs(self.study.stages[name]["dir"]))
        gap = now - self.last_study
        if (self.pending and gap >= STUDY_GAP_S) or gap >= self.every_s:
            self._study_line()

    def _stage(self, i: int, n: int, stage):
        """A stage starts: its progress callback (the ETA is added here if the source has none)."""
        name = stage.name
        if self.bar is not None:
            self.tasks[name] = self.bar.add_task(name, total=None, info="starting")
        else:
            self._line(f"[{name}] started: {stage.title}")
        if self.study is not None and name in self.study.stages:
            self.study.start(name, finished_runs(self.study.stages[name]["dir"]))
            if self.last_study == -math.inf:
                self._study_line()
        last = {"t": self.clock()}

        def show(step: int, total: int, info: dict) -> None:
            if info.get("cached"):
                return
            if self.bar is not None:
                self.bar.update(self.tasks[name], completed=step, total=total, info=describe(step, total, info))
            elif self.clock() - last["t"] >= self.every_s:
                last["t"] = self.clock()
                self._line(f"[{name}] {describe(step, total, info)}")
            self._tick(name, step, total, info)
        return with_eta(show, self.clock)

    def done(self, name: str, rec: dict, i: int, n: int) -> None:
        """A stage ended (or was found cached): one line with its work and wall times, then the
        study line (for a cached stage, with the next line)."""
        if self.bar is not None and name in self.tasks:
            self.bar.remove_task(self.tasks.pop(name))
        if rec.get("cached"):
            what = "cached"
        else:
            t = rec.get("timing") or {}
            what = f"{rec['status']}, work {t.get('work_s', rec.get('seconds', 0)):.0f} s, wall " \
                   f"{t.get('wall_s', rec.get('seconds', 0)):.0f} s" + (f", {t['threads']} thread(s)" if t.get("threads") else "")
        self._line(f"[{i}/{n}] {name}: {what}")
        if self.study is not None and name in self.study.stages:
            self.study.done(name, rec, finished_runs(self.study.stages[name]["dir"]))
            self.pending = True
            if not rec.get("cached"):
                self._study_line()
