"""Running a study's stages (its catalogue is the caller's: `study.stages` for prefixlab's study):
key them, reuse a cached stage record (`engine.cache`), run the others serially here or in
parallel on Ray (`engine.parallel`, critical path first). Each run stage records its work time apart from its
wall time (`engine.timing`), and its work goes into out/timings.json for the next schedule.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.cache import cached, heal_bases, run_stage, stage_dir, study_threads
from engine.parallel import announce, default_threads, run_parallel
from engine.progress import finished_runs, with_eta
from engine.schedule import record_history
from engine.stage import Stage
from prefixlab_common.errors import UserError


def stage_keys(stages: list[Stage], only: list[str] | None = None) -> dict[str, str]:
    """Each stage's key, in dependency order (upstream keys first); an unknown name in `only` is refused."""
    if only:
        unknown = [s for s in only if s not in {x.name for x in stages}]
        if unknown:
            raise UserError(f"unknown stage {unknown[0]!r}; stages: {', '.join(s.name for s in stages)}")
    keys: dict[str, str] = {}
    for stage in stages:
        keys[stage.name] = stage.key(keys)
    return keys


def run_stages(out: Path, stages: list[Stage], progress_factory=None, only: list[str] | None = None,
               workers: int = 1, ray_address: str | None = None, on_done=None, threads: int | None = None,
               device=None, on_note=None) -> dict:
    """Run (or reuse) every stage of `stages` (in dependency order); returns {name: stage record}
    in stage order.
    progress_factory(i, n, stage) returns a Progress callback for that stage (or None); its info
    carries the ETA (`engine.progress`); a factory with a `plan(plan, workers)` method hears the
    study's plan first (`engine.schedule.study_plan`, for the study's one ETA). on_done(name, record, n_done, n_total) is called as each
    stage finishes or is found cached. workers > 1 or a Ray address: independent stages run in
    parallel on Ray (`engine.parallel`); threads: torch threads per worker (default: the cores
    divided among the workers, and a stage alone in the queue takes every free worker; given, every
    stage and group gets exactly that many, so the study's bits do not depend on its schedule).
    on_note(line): what the study healed or kept (a record set aside, a base rebuilt, its thread count)."""
    out = Path(out)
    keys = stage_keys(stages, only)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    heal_bases(out, stages, keys, on_note)
    if workers > 1 or ray_address:
        cluster = bool(ray_address or os.environ.get("RAY_ADDRESS"))
        pinned = threads is not None or cluster
        threads = study_threads(out, threads or default_threads(workers, ray_address), on_note)
        return run_parallel(out, stages, keys, only, workers, ray_address, on_done, threads, device,
                            on_note, progress_factory, pinned)
    before = torch.get_num_threads()
    torch.set_num_threads(study_threads(out, threads or before, on_note))
    try:
        return _run_here(out, stages, keys, only, progress_factory, device, on_note, on_done)
    finally:
        torch.set_num_threads(before)


def _run_here(out: Path, stages: list[Stage], keys: dict[str, str], only, progress_factory, device,
              on_note, on_done=None) -> dict:
    records: dict[str, dict] = {}
    todo = [s.name for s in stages if not only or s.name in only]
    announce(progress_factory, out, [s for s in stages if s.name in todo], keys, 1)
    for i, stage in enumerate(stages):
        if stage.name not in todo:
            continue
        prog = progress_factory(i, len(stages), stage) if progress_factory else None
        rec = cached(out, stage, keys[stage.name], on_note)
        if rec is not None:
            if prog:
                prog(1, 1, {"cached": True})
        else:
            rec = run_stage(out, stage, keys[stage.name], records, with_eta(prog) if prog else None, device)
            record_history(out, stage.name, keys[stage.name], stage.estimate, rec["timing"],
                           finished_runs(stage_dir(out, stage, keys[stage.name])))
        records[stage.name] = rec
        if on_done:
            on_done(stage.name, rec, len(records), len(todo))
    return records
