"""Recipes as data: the long runs' schedule reaches only the long runs, fields added later stay out
of the keys at their defaults, and the sample-efficiency stage's key ignores E3's own run recipe."""

from dataclasses import replace
from pathlib import Path

import pytest

import study.stages as stages_mod
from study.recipes import RECIPES
from study.experiments.toy import train_options


def test_long_schedule_reaches_the_long_runs_only():
    r = replace(RECIPES["quick"]["E4"], long_schedule="decay")
    assert train_options(r, "lora", 0, long=True)["schedule"] == "decay"
    assert "schedule" not in train_options(r, "lora", 0, long=False)  # the method's own ([P]'s constant)
    assert "schedule" not in train_options(replace(r, long_schedule=None), "lora", 0, long=True)
    # a per-method override in the recipe still wins
    t = replace(r, tune={"lora": {"schedule": "constant"}})
    assert train_options(t, "lora", 0, long=True)["schedule"] == "constant"


def test_fields_at_their_defaults_stay_out_of_the_recipe_dict():
    r = RECIPES["micro"]["E1"]
    assert "long_schedule" not in r.to_dict() and "precision" not in r.to_dict()
    assert replace(r, long_schedule="decay").to_dict()["long_schedule"] == "decay"
    assert replace(r, precision="bf16").to_dict()["precision"] == "bf16"


def _keys(monkeypatch, recipes: dict) -> dict[str, str]:
    from study.reproduce import plan
    monkeypatch.setitem(stages_mod.RECIPES, "micro", recipes)
    return plan(Path("/tmp/recipe-keys"), "micro", None)[1]


@pytest.mark.parametrize("change", [dict(long_steps=99), dict(long_schedule="decay"), dict(tune_steps=7),
                                    dict(seeds=(0, 1)), dict(prefix_init="slot")])
def test_sample_eff_key_ignores_what_only_E3s_runs_read(monkeypatch, change):
    before = _keys(monkeypatch, dict(RECIPES["micro"]))
    after = _keys(monkeypatch, {**RECIPES["micro"], "E3": replace(RECIPES["micro"]["E3"], **change)})
    assert after["sample_eff"] == before["sample_eff"]
    assert after["E3"] != before["E3"]  # E3 itself is recomputed


def test_sample_eff_key_follows_the_base(monkeypatch):
    before = _keys(monkeypatch, dict(RECIPES["micro"]))
    changed = {e: replace(r, pretrain_steps=r.pretrain_steps + 1) if e in ("E3", "E4") else r
               for e, r in RECIPES["micro"].items()}
    after = _keys(monkeypatch, changed)
    assert after["sample_eff"] != before["sample_eff"] and after["base-E3"] != before["base-E3"]


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return "bf16" if value == "fp32" else value + "x"
    if isinstance(value, dict):
        return {**value, "d_model": 8}
    if isinstance(value, tuple):
        return value + (9,)
    return "decay"


def test_base_stage_keys_follow_exactly_what_the_base_reads(monkeypatch):
    """BASE_FIELDS against base_key: a field the base reads changes the base's directory and its
    stage key; any other field changes neither (so E3's run recipe leaves base-E3 cached)."""
    from dataclasses import fields
    from study.experiments.e1 import BASE
    from study.experiments.toy import base_key
    r = RECIPES["micro"]["E1"]
    before = _keys(monkeypatch, dict(RECIPES["micro"]))
    for f in fields(r):
        if f.name == "preset":  # a model preset that exists
            continue
        value = 77 if f.name == "long_steps" else _changed(getattr(r, f.name))
        new = replace(r, **{f.name: value})
        after = _keys(monkeypatch, {**RECIPES["micro"], "E1": new})
        reads = f.name in stages_mod.BASE_FIELDS
        assert (base_key(BASE, new) != base_key(BASE, r)) == reads, f.name
        if f.name != "precision":  # a study sets it (stages_for's argument: test_precision.py)
            assert (after["base-E1"] != before["base-E1"]) == reads, f.name
