"""Running the study's stages (`study.stages` is the catalogue): plan them, reuse a cached
stage record, run the others serially here or in parallel on Ray (`study.parallel`).

A stage runs into out/stages/<name>-<key>/ and writes its record (result.json) atomically when it
finishes, so a rerun skips it; an interrupted stage resumes its runs. A stage that fails is
recorded (status "failed") and the other stages still run; a full or read-only disk stops the
study instead (OSError), since every later stage would fail the same way.

The cache heals (docs/faults.md): a stage record that does not read back whole is set aside
(result.json.corrupt-<time>) and the stage recomputed; a base run whose model no longer matches
the SHA-256 it recorded is set aside with its base stage's record, and pretrained again. The
study's torch thread count is recorded (study.json) and kept when it resumes on another machine,
since float sums at another thread count end in other bits.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from pathlib import Path

from study.stages import Stage, stages_for
from toy_models.errors import UserError
from toy_models.lock import STORAGE_ERRNOS
from toy_models.runs import MODEL_FILE, RunDir, load_tensors, read_json, set_aside, write_json



def run_stage(out: Path, stage: Stage, key: str, upstream: dict, prog, device=None) -> dict:
    """Run one stage into out/stages/<name>-<key>/ and write its record (result.json)."""
    d = out / "stages" / f"{stage.name}-{key}"
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        result = stage.fn(d, stage.config, upstream, prog, device=device)
        rec = {"name": stage.name, "title": stage.title, "status": "done", "config": stage.config,
               "key": key, "seconds": time.perf_counter() - t0, "result": result}
    except KeyboardInterrupt:
        raise
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:
            raise
        rec = _failed(stage, key, t0, e)
    except Exception as e:  # a failed stage is reported; the others still run
        rec = _failed(stage, key, t0, e)
    write_json(d / "result.json", rec)
    # the record as it reads back from disk (sorted keys): a fresh, a resumed and a parallel study
    # hand the table and the report exactly the same data
    return {**read_json(d / "result.json"), "cached": False}


def _failed(stage: Stage, key: str, t0: float, e: BaseException) -> dict:
    return {"name": stage.name, "title": stage.title, "status": "failed", "config": stage.config,
            "key": key, "seconds": time.perf_counter() - t0,
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


def cached(out: Path, stage: Stage, key: str, on_note=None) -> dict | None:
    """The stage's record if it is done. One that does not read back whole (truncated, not JSON,
    incomplete) is set aside, not deleted, and the stage runs again."""
    marker = out / "stages" / f"{stage.name}-{key}" / "result.json"
    if not marker.is_file():
        return None
    try:
        rec = read_json(marker)
        problem = _problem(rec, stage, key)
    except UserError:
        rec, problem = None, "is not valid JSON"
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
    import torch
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


def plan(out: Path, preset: str, only: list[str] | None) -> tuple[list[Stage], dict[str, str]]:
    stages = stages_for(preset, out)
    if only:
        unknown = [s for s in only if s not in {x.name for x in stages}]
        if unknown:
            raise UserError(f"unknown stage {unknown[0]!r}; stages: {', '.join(s.name for s in stages)}")
    keys: dict[str, str] = {}
    for stage in stages:
        keys[stage.name] = stage.key(keys)
    return stages, keys


def run_stages(out: Path, preset: str = "quick", progress_factory=None, only: list[str] | None = None,
               workers: int = 1, ray_address: str | None = None, on_done=None, threads: int | None = None,
               device=None, on_note=None) -> dict:
    """Run (or reuse) every stage; returns {name: stage record} in stage order.
    progress_factory(i, n, stage) returns a Progress callback for that stage (or None).
    workers > 1 or a Ray address: independent stages run in parallel as Ray tasks (`study.parallel`);
    on_done(name, record, n_done, n_total) is called as each stage finishes there; threads: torch
    threads per Ray task (default: the cores divided among the workers). on_note(line): what the
    study healed or kept (a record set aside, a base rebuilt, its thread count)."""
    import torch
    out = Path(out)
    stages, keys = plan(out, preset, only)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    heal_bases(out, stages, keys, on_note)
    if workers > 1 or ray_address:
        from study.parallel import default_threads, run_parallel  # lazy: Ray only for a parallel study
        threads = study_threads(out, threads or default_threads(workers, ray_address), on_note)
        return run_parallel(out, preset, stages, keys, only, workers, ray_address, on_done, threads, device,
                            on_note)
    before = torch.get_num_threads()
    torch.set_num_threads(study_threads(out, threads or before, on_note))
    try:
        return _run_here(out, stages, keys, only, progress_factory, device, on_note)
    finally:
        torch.set_num_threads(before)


def _run_here(out: Path, stages: list[Stage], keys: dict[str, str], only, progress_factory, device,
              on_note) -> dict:
    records: dict[str, dict] = {}
    for i, stage in enumerate(stages):
        if only and stage.name not in only:
            continue
        prog = progress_factory(i, len(stages), stage) if progress_factory else None
        rec = cached(out, stage, keys[stage.name], on_note)
        if rec is not None:
            if prog:
                prog(1, 1, {"cached": True})
        else:
            rec = run_stage(out, stage, keys[stage.name], records, prog, device)
        records[stage.name] = rec
    return records
