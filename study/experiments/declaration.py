"""What an experiment declares about itself (`Experiment`): each experiment module of this
package ends in one, and `study.experiments.registry` lists them. The stage catalogue
(`study.stages`), the paper-vs-lab table (`study.table`) and the report (`reports.study`) read
everything they need from the declarations, so adding an experiment is one module plus one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# the study's scales (`reproduce --scale`); a model's size is its preset (toy_models.model.PRESETS).
# Stage configs keep the key "preset" for the scale, so that cached stages stay valid.
SCALES = ("quick", "paper", "micro")


def no_rows(records: dict) -> list[dict]:
    """The rows of an experiment that did not finish: none."""
    return []


@dataclass(frozen=True)
class Experiment:
    """One experiment of the study, as a cached stage, its table rows and its report section.

    name: its stage's name (part of the stage's key: renaming it recomputes the stage).
    title: its stage's title (the progress lines and the report's stage table).
    run: what it computes. A toy experiment (`recipe` set) gives run(out, bases, recipe, config,
        progress, device), which `study.experiments.toy.ToyStage` turns into a stage function; any
        other gives the stage function itself, run(out, config, upstream results, progress, device).
        Either returns a JSON-serializable result.
    config: (scale, {recipe name: Recipe in the study's precision}) -> its stage's config. The
        config is part of the key: a stage is recomputed exactly when it changes.
    rows: its result -> its rows of the paper-vs-lab table (`study.rows.row`).
    estimate: its config -> seconds at one thread, roughly (the schedule's guess before it has run).
    section: its report section, the module `reports.experiments.<section>` whose
        section(result, records) renders it (named, not imported: `reports` sits above `study`).
    base: the base model it tunes, (task, prompt slots), or None. Experiments whose base and recipe
        give the same base key share one base stage, named after the first of them in the registry.
    recipe: the entry of `study.recipes.RECIPES[scale]` it trains under (None: no toy training).
    needs: the stages whose results it reads (its base stage is added for it).
    scales: the scales whose study runs it.
    missing_rows: (every stage record) -> its rows when it did not finish (default none).
    """

    name: str
    title: str
    run: Callable[..., dict]
    config: Callable[[str, dict], dict]
    rows: Callable[[dict], list[dict]]
    estimate: Callable[[dict], float]
    section: str | None
    base: tuple[str, int] | None = None
    recipe: str | None = None
    needs: tuple[str, ...] = ()
    scales: tuple[str, ...] = SCALES
    missing_rows: Callable[[dict], list[dict]] = no_rows
