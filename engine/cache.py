"""A study's stage directories: run one stage into its directory and record it, reuse a cached
record, and heal what does not read back (docs/faults.md). Below both ways of running stages
(`engine.driver` here, `engine.parallel` on Ray).

A stage runs into out/stages/<name>-<key>/ and writes its record (result.json) atomically when it
finishes, so a rerun skips it; an interrupted stage resumes its runs. A stage that fails is
recorded (status "failed") and the other stages still run; a full or read-only disk stops the
study instead (OSError), since every later stage would fail the same way.

The cache heals: a stage record that does not read back whole is set aside
(result.json.corrupt-<time>) and the stage recomputed; a base run whose model no longer matches
the SHA-256 it recorded is set aside with its base stage's record, and pretrained again. The
study's torch thread count is recorded (study.json) and kept when it resumes on another machine,
since float sums at another thread count end in other bits.
"""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

import torch

from engine.stage import Stage
from engine.timing import StageClock
from prefixlab_common.errors import UserError
from toy_models.lock import STORAGE_ERRNOS
from toy_models.runs import MODEL_FILE, RunDir, load_tensors, read_json, set_aside, write_json


def stage_dir(out: Path, stage: Stage, key: str) -> Path:
    return out / "stages" / f"{stage.name}-{key}"


def run_stage(out: Path, stage: Stage, key: str, upstream: dict, prog, device=None,
              clock: StageClock | None = None) -> dict:
    """Run one stage into out/stages/<name>-<key>/ and write its record (result.json). Its
    times go under "timing" (`engine.timing`: work apart from wall); "seconds" is its wall time."""
    d = stage_dir(out, stage, key)
    d.mkdir(parents=True, exist_ok=True)
    clock = (clock or StageClock(threads=torch.get_num_threads())).start()
    try:
        result = stage.fn(d, stage.config, upstream, prog, device=device)
        rec = {"name": stage.name, "title": stage.title, "status": "done", "config": stage.config,
               "key": key, "result": result}
    except KeyboardInterrupt:
        raise
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:
            raise
        rec = _failed(stage, key, e)
    except Exception as e:  # a failed stage is reported; the others still run
        rec = _failed(stage, key, e)
    clock.stop()
    rec.update(seconds=clock.wall_s, timing=clock.to_json())
    write_json(d / "result.json", rec)
    # the record as it reads back from disk (sorted keys): a fresh, a resumed and a parallel study
    # hand the table and the report exactly the same data
    return {**read_json(d / "result.json"), "cached": False}


def _failed(stage: Stage, key: str, e: BaseException) -> dict:
    return {"name": stage.name, "title": stage.title, "status": "failed", "config": stage.config, "key": key,
            "error": f"{e.__class__.__name__}: {e}".splitlines()[0][:300],
            "traceback": traceback.format_exc()[-3000:]}


def _problem(rec, stage: Stage, key: str) -> str | None:
    """What makes a stage record unusable (None: it is whole)."""
    if not isinstance(rec, dict):
        return "is not a stage record"
    if rec.get("name") != stage.name or rec.get("key") != key:
        return "belongs to another stage"
    if rec.get("status") not in ("done", "failed"):
        return "has no status"
    if rec["status"] == "done" and not isinstance(rec.get("result"), dict):
        return "has no result"
    return None


def _read_record(marker: Path, stage: Stage, key: str) -> tuple[dict | None, str | None]:
    """The record at `marker` and what makes it unusable (None: it is whole)."""
    try:
        rec = read_json(marker)
    except UserError:
        return None, "is not valid JSON"
    return rec, _problem(rec, stage, key)


def is_cached(out: Path, stage: Stage, key: str) -> bool:
    """Whether the stage's record is whole and done (read only: `cached` heals what is not)."""
    marker = out / "stages" / f"{stage.name}-{key}" / "result.json"
    try:
        rec, problem = _read_record(marker, stage, key) if marker.is_file() else (None, "missing")
    except OSError:
        return False
    return problem is None and rec.get("status") == "done"


def cached(out: Path, stage: Stage, key: str, on_note=None) -> dict | None:
    """The stage's record if it is done. One that does not read back whole (truncated, not JSON,
    incomplete) is set aside, not deleted, and the stage runs again."""
    marker = out / "stages" / f"{stage.name}-{key}" / "result.json"
    if not marker.is_file():
        return None
    rec, problem = _read_record(marker, stage, key)
    if problem is not None:
        aside = set_aside(marker, "corrupt")
        if on_note:
            on_note(f"stage {stage.name}: its cached record {problem}; set aside as {aside.name}, recomputing")
        return None
    if rec.get("status") == "done":
        return {**rec, "cached": True}
    return None


def _base_broken(path: Path) -> str | None:
    """Why a complete base run can no longer be used (None: its model is intact)."""
    run = RunDir(path)
    bad = run.verify()
    if bad:
        return f"{', '.join(bad)} does not match its recorded SHA-256"
    if not (path / "checksums.json").is_file():  # a base written before checksums: can it load?
        try:
            load_tensors(path / MODEL_FILE)
        except UserError:
            return f"{MODEL_FILE} does not load"
    return None


def heal_bases(out: Path, stages: list[Stage], keys: dict[str, str], on_note=None) -> None:
    """Set aside every complete base run of the study whose model is broken, and the records of
    the base stages that made it, so that the base stage pretrains it again (the stages that
    tuned on it keep their records: their runs recorded the SHA-256 of the base they used)."""
    bases = out / "bases"
    if not bases.is_dir():
        return
    for path in sorted(p for p in bases.iterdir() if p.is_dir() and RunDir(p).complete):
        why = _base_broken(path)
        if why is None:
            continue
        aside = set_aside(path, "corrupt")
        if on_note:
            on_note(f"base {path.name}: {why}; set aside as {aside.name}, pretraining it again")
        for stage in stages:
            marker = out / "stages" / f"{stage.name}-{keys[stage.name]}" / "result.json"
            if stage.name.startswith("base-") and marker.is_file():
                with contextlib.suppress(UserError):
                    base = (read_json(marker).get("result") or {}).get("base")
                    if base and Path(base).resolve() == path.resolve():
                        set_aside(marker, "stale")


def study_threads(out: Path, threads: int, on_note=None) -> int:
    """The torch threads the study's runs train with: those it first ran with (study.json), so
    that a study resumed on a machine with another core count ends in the same bits."""
    meta = out / "study.json"
    recorded = None
    if meta.is_file():
        try:
            recorded = read_json(meta).get("torch_threads")
        except UserError:
            set_aside(meta, "corrupt")
    if not isinstance(recorded, int) or recorded < 1:
        write_json(meta, {"torch_threads": threads, "torch": torch.__version__})
        return threads
    if recorded != threads and on_note:
        on_note(f"this study trained at {recorded} torch thread(s); it keeps {recorded} (not {threads}), "
                "so that its resumed runs end in the same bits")
    return recorded
