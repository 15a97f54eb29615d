"""`prefixlab reproduce`: every stage (cached), then the paper-vs-lab table and report.json.
The HTML report is rendered from what this returns (`reports.study`)."""

from __future__ import annotations

import time
from pathlib import Path

from engine.driver import run_stages, stage_keys
from engine.timing import study_timing
from study.stages import stages_for
from study.table import paper_vs_lab
from prefixlab_common.errors import UserError
from toy_models.lock import DirLock
from toy_models.runs import write_json
from study.recipes import PER_STAGE, recipe_precision
from toy_models.precision import native_bf16, resolve_precision
from toy_models.training import resolve_device


def _content(records: dict) -> dict:
    """What the report says, without timings: identical for an interrupted-and-resumed study."""
    strip_keys = {"seconds", "cached", "timing", "timings", "fit_seconds", "total_seconds", "traceback",
                  "train_seconds", "seqs_per_s", "elapsed_s", "wall_s"}

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()
                    if k not in strip_keys and not k.endswith(("seconds", "_s"))}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(records)


def study_precision(precision: str | None, device) -> str:
    """A study's precision: an explicit choice applies to every training stage (resolve_precision:
    bf16 without native bf16 is refused). With none: bf16 on a CUDA GPU that has it; on a CPU with
    native bf16, "per-stage" (bf16 only for the recipes measured faster in it and validated in it,
    study.recipes.Recipe.bf16_pays); fp32 elsewhere."""
    if precision is None and device.type == "cpu" and native_bf16(device):
        return PER_STAGE
    return resolve_precision(precision, device)


def stage_precision(stages) -> dict[str, str]:
    """Each training stage's precision, as its config (so its key) holds it."""
    return {s.name: recipe_precision(s.config["recipe"]) for s in stages if "recipe" in s.config}


def plan(out: Path, scale: str, only: list[str] | None, precision: str = "fp32") -> tuple[list, dict[str, str]]:
    """The study's stages at `scale` and their keys, nothing run (an unknown scale or stage is refused)."""
    stages = stages_for(scale, Path(out), precision)
    return stages, stage_keys(stages, only)


def reproduce(out: Path, scale: str = "quick", progress_factory=None, only: list[str] | None = None,
              workers: int = 1, ray_address: str | None = None, on_done=None, threads: int | None = None,
              device=None, on_note=None, precision: str | None = None) -> dict:
    """Run every stage (cached; in parallel on Ray with workers > 1 or a Ray address), then write
    report.json (the table and each stage's content, identical whichever way the stages ran, and
    apart from them the study's timing: its wall time, its stages' work, its longest chain).
    device: where the toy runs train ("auto", "cpu", "cuda", "mps"); probes stay on the CPU in fp32.
    precision: the toy runs' training precision (fp32, bf16 or auto for every training stage,
    toy_models/precision.py; None: `study_precision`). bf16 enters the stage keys.
    The study is the one writer of `out` meanwhile (`toy_models.lock`): a second study on it stops
    at once, naming the first. on_note(line): what the study healed or took over; the same lines
    are returned under "notes"."""
    out = Path(out)
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    # a device this machine lacks, or bf16 where it has none, is refused before any stage runs
    precision = study_precision(precision, resolve_device(device))
    stages, _ = plan(out, scale, only, precision)  # an unknown scale or stage is refused before anything is written
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        if on_note:
            on_note(line)
    with DirLock(out, "study") as lock:
        if lock.note:
            note(lock.note)
        t0 = time.perf_counter()
        records = run_stages(out, stages, progress_factory, only, workers, ray_address, on_done, threads, device,
                             on_note=note)
        # the study's speed from its own records: wall time against work and the longest chain
        timing = study_timing(records, {s.name: s.needs for s in stages}, time.perf_counter() - t0,
                              workers if workers > 1 or ray_address else 1)
        table = paper_vs_lab(records)
        content = {"preset": scale, "precision": precision, "stage_precision": stage_precision(stages),
                   "table": table, "stages": _content(records), "timing": timing}
        write_json(out / "report.json", content)
    return {"preset": scale, "precision": precision, "stage_precision": content["stage_precision"], "records": records, "table": table, "report_json": str(out / "report.json"),
            "notes": notes, "timing": timing}
