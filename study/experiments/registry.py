"""The study's experiments, in the order of the paper-vs-lab table and of the report. A new
experiment is its own module in this package, ending in its declaration
(`study.experiments.declaration.Experiment`), plus one line here; the stage catalogue, the bases,
the cost estimates, the table, the report and the registry's tests (tests/study/test_registry.py)
all read this list."""

from __future__ import annotations

from prefixlab_common.errors import UserError
from study.experiments import e1, e2, e3, e4, gemma3, language, llama, prefix_plus, probing, reparam, sample_eff, thm1, thm2
from study.experiments.declaration import Experiment

REGISTRY: tuple[Experiment, ...] = (
    e1.EXPERIMENT,
    e2.EXPERIMENT,
    e3.EXPERIMENT,
    e4.EXPERIMENT,
    probing.EXPERIMENT,
    llama.EXPERIMENT,
    gemma3.EXPERIMENT,
    thm1.EXPERIMENT,
    thm2.EXPERIMENT,
    sample_eff.EXPERIMENT,
    reparam.EXPERIMENT,
    language.EXPERIMENT,
    *prefix_plus.EXPERIMENTS,
)
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in REGISTRY}


def experiment(name: str) -> Experiment:
    """The experiment called `name`: the one place an unknown experiment name is refused."""
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
