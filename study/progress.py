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
import os
import sys
import time
from pathlib import Path
# Lazy import: rich, only when the display is a terminal (a log file gets plain lines).

WRITE_EVERY_S = 2.0
LINE_EVERY_S = 60.0


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
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.state))
            os.replace(tmp, self.path)
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
    info: dict = {"pieces": len(live), "threads": sum(s.get("threads", 1) for s in live)}
    losses = [s["info"]["loss"] for s in live if isinstance(s["info"].get("loss"), (int, float))]
    if losses:
        info["loss"] = sum(losses) / len(losses)
    etas = [s["info"]["eta_s"] for s in live if "eta_s" in s["info"]]
    if etas:
        info["eta_s"] = max(etas)
    return {"step": sum(s["step"] for s in live), "total": sum(s["total"] for s in live), "info": info}


class StudyProgress:
    """The study's display: on a terminal, one rich bar per running stage (step/total, loss, ETA);
    otherwise a line when a stage starts, one a minute while it runs, and one when it ends with
    its work and wall times. Use `factory` as reproduce's progress_factory and `done` as on_done."""

    def __init__(self, file=None, tty: bool | None = None, every_s: float = LINE_EVERY_S, clock=time.monotonic):
        self.file = file or sys.stderr
        self.tty = self.file.isatty() if tty is None else tty
        self.every_s, self.clock = every_s, clock
        self.bar = None
        self.tasks: dict[str, object] = {}

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
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, file=self.file, flush=True)

    def factory(self, i: int, n: int, stage):
        """A stage starts: its progress callback (the ETA is added here if the source has none)."""
        name = stage.name
        if self.bar is not None:
            self.tasks[name] = self.bar.add_task(name, total=None, info="starting")
        else:
            self._line(f"[{name}] started: {stage.title}")
        last = {"t": self.clock()}

        def show(step: int, total: int, info: dict) -> None:
            if info.get("cached"):
                return
            if self.bar is not None:
                self.bar.update(self.tasks[name], completed=step, total=total, info=describe(step, total, info))
            elif self.clock() - last["t"] >= self.every_s:
                last["t"] = self.clock()
                self._line(f"[{name}] {describe(step, total, info)}")
        return with_eta(show, self.clock)

    def done(self, name: str, rec: dict, i: int, n: int) -> None:
        """A stage ended (or was found cached): one line with its work and wall times."""
        if self.bar is not None and name in self.tasks:
            self.bar.remove_task(self.tasks.pop(name))
        if rec.get("cached"):
            what = "cached"
        else:
            t = rec.get("timing") or {}
            what = f"{rec['status']}, work {t.get('work_s', rec.get('seconds', 0)):.0f} s, wall " \
                   f"{t.get('wall_s', rec.get('seconds', 0)):.0f} s" + (f", {t['threads']} thread(s)" if t.get("threads") else "")
        self._line(f"[{i}/{n}] {name}: {what}")
