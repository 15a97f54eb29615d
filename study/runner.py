"""Running the study's stages (`study.stages` is the catalogue): plan them, reuse a cached
stage record, run the others serially here or in parallel on Ray (`study.parallel`).

A stage runs into out/stages/<name>-<key>/ and writes its record (result.json) atomically when it
finishes, so a rerun skips it; an interrupted stage resumes its runs. A stage that fails is
recorded (status "failed") and the other stages still run.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from study.stages import Stage, stages_for
from toy_models.errors import UserError
from toy_models.runs import read_json, write_json



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
    except Exception as e:  # a failed stage is reported; the others still run
        rec = {"name": stage.name, "title": stage.title, "status": "failed", "config": stage.config,
               "key": key, "seconds": time.perf_counter() - t0,
               "error": f"{e.__class__.__name__}: {e}".splitlines()[0][:300],
               "traceback": traceback.format_exc()[-3000:]}
    write_json(d / "result.json", rec)
    # the record as it reads back from disk (sorted keys): a fresh, a resumed and a parallel study
    # hand the table and the report exactly the same data
    return {**read_json(d / "result.json"), "cached": False}


def cached(out: Path, stage: Stage, key: str) -> dict | None:
    marker = out / "stages" / f"{stage.name}-{key}" / "result.json"
    if marker.is_file():
        rec = read_json(marker)
        if rec.get("status") == "done":
            return {**rec, "cached": True}
    return None


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
               device=None) -> dict:
    """Run (or reuse) every stage; returns {name: stage record} in stage order.
    progress_factory(i, n, stage) returns a Progress callback for that stage (or None).
    workers > 1 or a Ray address: independent stages run in parallel as Ray tasks (`study.parallel`);
    on_done(name, record, n_done, n_total) is called as each stage finishes there; threads: torch
    threads per Ray task (default: the cores divided among the workers)."""
    out = Path(out)
    stages, keys = plan(out, preset, only)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    if workers > 1 or ray_address:
        from study.parallel import run_parallel  # lazy: Ray is imported only for a parallel study
        return run_parallel(out, preset, stages, keys, only, workers, ray_address, on_done, threads, device)
    records: dict[str, dict] = {}
    for i, stage in enumerate(stages):
        if only and stage.name not in only:
            continue
        prog = progress_factory(i, len(stages), stage) if progress_factory else None
        rec = cached(out, stage, keys[stage.name])
        if rec is not None:
            if prog:
                prog(1, 1, {"cached": True})
        else:
            rec = run_stage(out, stage, keys[stage.name], records, prog, device)
        records[stage.name] = rec
    return records
