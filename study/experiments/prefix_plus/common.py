"""What the [PT+] experiments share: their method, their table column and how they train."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from prefixlab_common.progress import Progress
from tuning import make_method
from tuning.pipeline import load_run
from study.experiments.toy import Base, collect, ensure_pretrain, job, run_jobs
from study.recipes import Recipe

METHOD = "prefix_plus"
PAPER = "(beyond [P]: the lab's question)"  # the rows' paper column: no paper measured these


def tune(out: Path, bases: Path, base_spec: Base, r: Recipe, named: list[tuple[str, str, dict, bool]],
         progress: Progress | None, device) -> tuple[Path, dict, dict, dict, dict]:
    """Train [PT+] runs (name, task, options, long) for every seed of `r` on `base_spec`'s base, with
    the method's own lr and schedule (`study.experiments.toy.train_options`). Returns the base, and per
    name the accuracy over seeds, the first seed's run, its curve and the run's parameter count."""
    base = ensure_pretrain(bases, base_spec, r, progress, device)
    model = load_run(base).model
    jobs = [job(out, name, METHOD, task, opts, r, seed, long=long) for seed in r.seeds for name, task, opts, long in named]
    acc, runs, curves = collect(jobs, run_jobs(base, jobs, progress, device))
    params = {name: make_method(METHOD, model, **opts).n_params for name, _, opts, _ in named}
    return base, acc, runs, curves, params


def toy_config(recipe: str) -> Callable[[str, dict], dict]:
    """A [PT+] toy stage's config: its scale and the recipe it shares with the [P] experiment."""
    return lambda scale, recipes: {"preset": scale, "recipe": recipes[recipe].to_dict()}
