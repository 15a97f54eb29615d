"""The study's stage catalogue: every experiment of the registry (`study.experiments.registry`) as a
cached stage (`engine.stage.Stage`), with a base-model stage for each distinct base they tune.

Stages are cached by a hash of their config and of their upstream stages' keys
(out/stages/<name>-<hash>/); `engine.driver` runs them, serially or in parallel.
"""

from __future__ import annotations

from pathlib import Path

from engine.schedule import priorities
from engine.stage import Stage
from prefixlab_common.errors import UserError
from study.experiments.declaration import SCALES, Experiment
from study.experiments.registry import EXPERIMENTS, REGISTRY
from study.experiments.toy import ToyStage, base_about, base_key, bases_dir, ensure_base, stage_recipe, step_seconds
from study.recipes import RECIPES

# what of a recipe its base reads (study.experiments.toy.base_key and ensure_pretrain): a base
# stage's key, so that an experiment's run recipe may change without touching its base or the
# stages that need only the base
BASE_FIELDS = ("preset", "model", "pretrain_steps", "pretrain_lr", "batch_size", "length", "num_digits",
               "eval_size", "slots", "precision")


def run_base(d: Path, cfg: dict, up: dict, progress=None, device=None) -> dict:
    """A base stage: pretrain (or reuse) one base model; the experiments that use it find it complete."""
    e = EXPERIMENTS[cfg["experiment"]]
    return ensure_base(bases_dir(d), e.base, stage_recipe(cfg, e.recipe), progress, device)


def estimate(name: str, cfg: dict) -> float:
    """A stage's static cost estimate (seconds at one thread) from its name and config: what
    `stages_for` gives it, here for a recorded config (the ETA replay of a finished study)."""
    if name.startswith("base-"):
        return step_seconds(cfg["recipe"]) * cfg["recipe"]["pretrain_steps"]
    return EXPERIMENTS[name].estimate(cfg)


def _base_stages(scale: str, recipes: dict, experiments: list[Experiment]) -> tuple[list[Stage], dict[str, str]]:
    """One stage per distinct base (named after the first experiment in the registry that tunes it),
    and each experiment's base stage."""
    stages, by_key, base_of = [], {}, {}
    for e in experiments:
        if e.base is None:
            continue
        key = base_key(e.base, recipes[e.recipe])
        if key not in by_key:  # E4 shares E3's base where their recipes' bases match (paper), not in quick
            by_key[key] = f"base-{e.name}"
            recipe = {k: v for k, v in recipes[e.recipe].to_dict().items() if k in BASE_FIELDS}
            cfg = {"preset": scale, "recipe": recipe, "experiment": e.name}
            stages.append(Stage(by_key[key], f"Base model for {e.name}: {base_about(e.base)}", cfg, run_base,
                                estimate=estimate(by_key[key], cfg)))
        base_of[e.name] = by_key[key]
    return stages, base_of


def stages_for(scale: str, out: Path, precision: str = "fp32", every_scale: bool = False) -> list[Stage]:
    """The study's stages in dependency order, the longest chain first (by the experiments'
    estimates), so that a sequential study starts on it and an interrupted one has it furthest.
    Each base model is a stage of its own, so the experiments that share it can run in parallel
    without pretraining it twice. precision: the toy runs' training precision, "fp32" or "bf16" for
    every training stage (resolved for the device: toy_models/precision.py), or "per-stage"
    (study.recipes.PER_STAGE: each recipe's `bf16_pays`); it enters the training stages' configs,
    so their keys. every_scale: also the experiments whose `scales` leave this scale out (tests)."""
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}; use quick (default), paper or micro")
    recipes = {e: r.in_precision(precision) for e, r in RECIPES[scale].items()}
    chosen = [e for e in REGISTRY if every_scale or scale in e.scales]
    stages, base_of = _base_stages(scale, recipes, chosen)
    for e in chosen:
        cfg = e.config(scale, recipes)
        fn = ToyStage(e.run, e.recipe) if e.recipe else e.run
        needs = ((base_of[e.name],) if e.name in base_of else ()) + e.needs
        stages.append(Stage(e.name, e.title, cfg, fn, needs=needs, estimate=estimate(e.name, cfg)))
    rank = priorities({s.name: s.estimate for s in stages}, {s.name: s.needs for s in stages})
    return sorted(stages, key=lambda s: -rank[s.name])  # a stage outranks every stage that needs it
