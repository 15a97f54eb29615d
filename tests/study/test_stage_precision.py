"""Precision per stage: a study that names no precision, on a CPU with native bf16, trains in bf16
only the recipes measured faster in it (study.recipes.Recipe.bf16_pays), and every other stage keeps
the key of an fp32 study; an explicit choice applies to every training stage."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import study.reproduce as reproduce_mod
import study.stages as stages_mod
from prefixlab_common.errors import UserError
from study.recipes import PER_STAGE, RECIPES
from study.reproduce import stage_precision, study_precision

CPU = torch.device("cpu")


def test_in_precision_follows_bf16_pays_only_per_stage():
    r = RECIPES["micro"]["E4"]
    pays = replace(r, bf16_pays=True)
    assert pays.in_precision(PER_STAGE).precision == "bf16" and r.in_precision(PER_STAGE).precision == "fp32"
    for study in ("fp32", "bf16"):  # an explicit study precision wins over the preference
        assert pays.in_precision(study).precision == study == r.in_precision(study).precision
    with pytest.raises(ValueError, match="per-stage"):
        r.in_precision("auto")  # resolved before a recipe sees it
    # the preference itself is never part of a key: only what it resolves to
    assert pays.to_dict() == r.to_dict() and "bf16_pays" not in pays.to_dict()


@pytest.mark.parametrize("native", [True, False])
def test_study_precision_default_is_per_stage_only_on_a_cpu_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(reproduce_mod, "native_bf16", lambda d: native)
    import toy_models.precision as prec
    monkeypatch.setattr(prec, "native_bf16", lambda d: native)
    assert study_precision(None, CPU) == (PER_STAGE if native else "fp32")
    assert study_precision("fp32", CPU) == "fp32"
    assert study_precision("auto", CPU) == ("bf16" if native else "fp32")  # auto: every stage
    if native:
        assert study_precision("bf16", CPU) == "bf16"
    else:
        with pytest.raises(UserError, match="AVX512-BF16"):
            study_precision("bf16", CPU)


def _plan(monkeypatch, recipes: dict, precision: str):
    from study.reproduce import plan
    monkeypatch.setitem(stages_mod.RECIPES, "micro", recipes)
    return plan(Path("/tmp/stage-precision"), "micro", None, precision)


def test_a_per_stage_study_trains_only_the_paying_recipe_in_bf16_on_its_own_base(monkeypatch):
    micro = dict(RECIPES["micro"])  # before _plan patches the catalogue
    recipes = {**micro, "E4": replace(micro["E4"], bf16_pays=True)}
    stages, keys = _plan(monkeypatch, recipes, PER_STAGE)
    _, fp32 = _plan(monkeypatch, recipes, "fp32")
    by = {s.name: s for s in stages}
    # E4's recipe resolves to bf16, so its base is no longer E3's: a base stage of its own
    assert by["E4"].needs == ("base-E4",) and by["E3"].needs == ("base-E3",)
    # the stages trained under E4's recipe (E4 and any experiment added under it, from the registry) and its base
    from study.experiments.registry import REGISTRY
    paying = {"base-E4"} | {e.name for e in REGISTRY if e.recipe == "E4"}
    assert {"base-E4", "E4"} <= paying
    assert stage_precision(stages) == {n: ("bf16" if n in paying else "fp32") for n in stage_precision(stages)}
    assert {n for n in keys if keys[n] != fp32.get(n)} == paying
    assert "base-E4" not in fp32  # in fp32 the micro E3 and E4 share one base
    # no recipe pays: a per-stage study is an fp32 study, key for key
    assert _plan(monkeypatch, micro, PER_STAGE)[1] == _plan(monkeypatch, micro, "fp32")[1]


def test_each_scale_trains_in_bf16_exactly_the_recipes_that_say_it_pays():
    from study.stages import stages_for
    for scale in ("micro", "quick", "paper"):
        stages = stages_for(scale, Path("/tmp/x"), PER_STAGE)
        prec = stage_precision(stages)
        for s in stages:
            e = s.config.get("experiment", s.name)
            if s.name in prec and e in RECIPES[scale]:
                assert prec[s.name] == ("bf16" if RECIPES[scale][e].bf16_pays else "fp32"), (scale, s.name)
        # a study of one precision shares nothing trained with a per-stage one where a recipe pays
        bf16 = stage_precision(stages_for(scale, Path("/tmp/x"), "bf16"))
        assert set(bf16.values()) == {"bf16"}


def test_a_base_estimate_in_bf16_is_cheaper():
    from study.stages import stages_for
    est = lambda precision: next(s.estimate for s in stages_for("quick", Path("/tmp/x"), precision) if s.name == "base-E4")
    assert est("bf16") < est("fp32")
