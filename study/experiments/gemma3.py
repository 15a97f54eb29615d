"""[P]'s Figure 5 on Gemma 3: the identities through a real prefix attention on a model with one
key/value head, a scaled query, q/k norms and sliding-window layers beside global ones
(`model_checks.check`; docs/llama.md). Gemma 3 270M when its package is installed (`make llama`),
else the tiny random Gemma 3 of the tests. The stage, its row and its declaration.
"""

from __future__ import annotations

from pathlib import Path

from study.experiments.declaration import Experiment
from study.recipes import MODEL_PACKAGES, real_weights
from study.rows import row
# Lazy import: model_checks.check (transformers) inside run, so planning a study never imports the model checks.

def run(d: Path, cfg: dict, up: dict, progress=None, device=None) -> dict:
    from model_checks.check import run_identity_check
    model = cfg["model"]
    res = run_identity_check(model=model, prefix="random", layers=cfg["layers"], prefix_len=1, seed=0)
    return {"model": model, "note": "Gemma 3 270M (real weights, Q4_K_M de-quantized to float32)" if model == "gemma3"
            else f"tiny random Gemma 3 ({MODEL_PACKAGES['gemma3']} is not installed: `make llama`)", **res.to_json()}


def config(scale: str, recipes: dict) -> dict:
    real = real_weights(scale, "gemma3")
    return {"model": "gemma3" if real else "tiny-gemma3", "layers": None}  # every layer: both layer types


def rows(g: dict) -> list[dict]:
    l0 = next((c for c in g["checks"] if c["layer"] == 0), None)
    if not l0:
        return []
    kinds = sorted({c.get("layer_type", "?") for c in g["checks"]})
    return [row("[P] Fig. 5", f"Gemma 3 layer-0 identities, {g['model']} ({g['dtype']}; "
                f"{g['n_kv_heads']} KV head, {' and '.join(k.replace('_attention', '') for k in kinds)} layers)",
                "hold on any transformer with a prefix (shown on LLaMA-7B)",
                f"rescaling {l0['rescale_max_err']:.1e}, bias (rel.) {l0['bias_rel_residual']:.1e}",
                bool(g["passed"]), f"within {g['dtype']} tolerance")]


EXPERIMENT = Experiment(
    name="gemma3", title="Gemma 3 prefix attention check (sliding and global layers)", run=run, config=config,
    rows=rows, estimate=lambda cfg: 100.0 if cfg["model"] == "gemma3" else 5.0, section="gemma3")
