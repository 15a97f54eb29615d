"""--precision auto|fp32|bf16: the choice and its refusal, its record in each run, the
runs and study stages of one precision never reused for another, bf16 training that converges,
and probes of a bf16-trained run that still give the layer-0 identities at fp32 tolerance."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import toy_models.precision as precision_mod
from cli import app
from prefixlab_common.errors import UserError
from probes.invariance import attention_invariance
from toy_models.pretraining import pretrain
from toy_models.precision import cpu_bf16_flags, resolve_precision
from toy_models.tasks import TaskSpec, fixed_test_set, resolve_task
from toy_models.training import TrainConfig
from tuning.fused import finetune_many, plan_groups
from tuning.pipeline import finetune, load_run

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)
CPU = torch.device("cpu")
TUNE = {"steps": 4, "batch_size": 8, "eval_every": 2, "eval_size": 16}


@pytest.fixture
def native(monkeypatch):
    """Pretend the CPU has, or lacks, native bf16: native(True) / native(False)."""
    def set_(has: bool) -> None:
        monkeypatch.setattr(precision_mod, "cpu_bf16_flags", lambda *a: ("avx512_bf16",) if has else ())
    return set_


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n\nflags : avx2\n")
    arm = tmp_path / "arm"
    arm.write_text("Features\t: fp asimd bf16 i8mm\n")
    old = tmp_path / "old"
    old.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512bw\n")  # AVX-512 without bf16: emulated
    assert cpu_bf16_flags(str(x86)) == ("amx_bf16", "avx512_bf16")
    assert cpu_bf16_flags(str(arm)) == ("bf16",)
    assert cpu_bf16_flags(str(old)) == ()
    assert cpu_bf16_flags(str(tmp_path / "missing")) == ()


def test_the_choice_on_a_cpu_with_and_without_native_bf16(native):
    native(True)
    assert [resolve_precision(p, CPU) for p in (None, "fp32", "auto", "bf16")] == ["fp32", "fp32", "bf16", "bf16"]
    native(False)
    assert [resolve_precision(p, CPU) for p in (None, "fp32", "auto")] == ["fp32", "fp32", "fp32"]
    with pytest.raises(UserError, match="--precision bf16: this CPU has neither AVX512-BF16 nor AMX"):
        resolve_precision("bf16", CPU)
    with pytest.raises(UserError, match="unknown precision 'fp16'; use auto, fp32, bf16"):
        resolve_precision("fp16", CPU)


@pytest.mark.parametrize("argv", [["pretrain", "--preset", "micro", "--steps", "2", "--out", "OUT"],
                                  ["finetune", "RUN", "--method", "prefix", "--task", "add1", "--out", "OUT"],
                                  ["reproduce", "--scale", "micro", "--out", "OUT"]])
@pytest.mark.parametrize("choice,message", [("bf16", "--precision bf16: this CPU has neither"),
                                            ("half", "unknown precision 'half'")])
def test_cli_refuses_bf16_without_native_support_in_one_line(tmp_path, native, argv, choice, message):
    native(False)
    out = tmp_path / "out"
    names = {"RUN": str(tmp_path / "missing"), "OUT": str(out)}
    res = CliRunner().invoke(app, [names.get(a, a) for a in argv] + ["--precision", choice])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.output
    assert not out.exists()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The same micro pretraining in fp32 and under bf16 autocast (precision="bf16" on a CPU that
    is told it has native bf16: it runs emulated where it has not, so the test runs on any CPU)."""
    d = tmp_path_factory.mktemp("precision")
    cfg = TrainConfig(steps=60, batch_size=16, lr=1e-2, warmup=5, eval_every=30, eval_size=64)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(precision_mod, "cpu_bf16_flags", lambda *a: ("avx512_bf16",))
        for name in ("fp32", "bf16"):
            m = pretrain(d / name, "add1", "micro", SPEC, cfg, precision=name)
            out[name] = (d / name, m)
    return out


def test_bf16_pretraining_converges_and_is_recorded(bases):
    final = {}
    for name in ("fp32", "bf16"):
        path, m = bases[name]
        rows = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
        final[name] = rows[-1]["loss"]
        # a loose drop: well below chance (ln V, where both start)
        assert final[name] < 0.7 * math.log(SPEC.vocab_size), (name, final[name])
        prov = json.loads((path / "provenance.json").read_text())
        config = json.loads((path / "config.json").read_text())
        assert prov["precision"] == name and prov["autocast"] == (name if name == "bf16" else None)
        # config.json names the precision only when it is not fp32 (fp32 runs keep their configs)
        assert config.get("precision") == (None if name == "fp32" else "bf16")
    assert abs(final["bf16"] - final["fp32"]) < 0.1 * final["fp32"], final  # the same learning curve, roughly
    # bf16 is not fp32: the weights differ (autocast did run), by far less than training moved them
    a = load_run(bases["fp32"][0]).model.state_dict()
    b = load_run(bases["bf16"][0]).model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_run_of_one_precision_is_not_reused_for_another(bases, tmp_path, native):
    native(True)
    base = bases["fp32"][0]
    finetune(base, "prefix", "add2", tmp_path / "t", {"length": 2}, TUNE, precision="bf16")
    assert json.loads((tmp_path / "t" / "config.json").read_text())["precision"] == "bf16"
    with pytest.raises(UserError, match="holds a complete run with other options"):
        finetune_many(base, [{"method": "prefix", "task": "add2", "out": tmp_path / "t",
                              "opts": {"length": 2}, "train": TUNE}])
    # the same precision is reused (the job names it, as the study's jobs do)
    again = finetune_many(base, [{"method": "prefix", "task": "add2", "out": tmp_path / "t", "opts": {"length": 2},
                                  "train": TUNE, "precision": "bf16"}], precision="fp32")
    assert again[0]["exact_acc"] == json.loads((tmp_path / "t" / "metrics.json").read_text())["exact_acc"]


def test_jobs_of_different_precisions_never_fuse(bases, tmp_path):
    base = bases["fp32"][0]
    jobs = [{"method": "prefix", "task": "add2", "out": tmp_path / f"j{i}", "opts": {"length": 2}, "train": TUNE,
             "seed": i, **({"precision": "bf16"} if i >= 2 else {})} for i in range(4)]
    assert sorted(plan_groups(base, jobs)) == [[0, 1], [2, 3]]


def test_probes_of_a_bf16_trained_run_give_the_layer0_identities_at_fp32_tolerance(bases, tmp_path, native):
    native(True)
    base = bases["bf16"][0]
    finetune(base, "prefix", "add2", tmp_path / "p", {"length": 2, "share": "simple"},
             {**TUNE, "steps": 20, "lr": 3e-2}, precision="bf16")
    run = load_run(tmp_path / "p")
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    assert all(t.dtype == torch.float32 for t in run.state.prefix_k)
    tokens = fixed_test_set(resolve_task("add2", SPEC), SPEC, 32).content
    inv = attention_invariance(run.model, run.state, tokens, batch_size=8)
    assert inv.summary["layer0_max_abs_diff"] <= 1e-5 and inv.summary["layer0_invariant"]


def _keys(scale: str, precision: str) -> dict[str, str]:
    from study.reproduce import plan
    return plan(Path("/tmp/precision-keys"), scale, None, precision)[1]


def test_a_study_stage_of_another_precision_is_not_reused():
    from study.recipes import RECIPES
    from study.experiments.e3 import BASE
    from study.experiments.toy import base_key
    from study.stages import stages_for
    fp32, bf16 = _keys("micro", "fp32"), _keys("micro", "bf16")
    # the stages that train a toy run (the bases, the experiments that declare a recipe: the registry
    # says which) and every stage that reads one of them; the LLaMA and theory stages are shared
    from study.experiments.registry import REGISTRY
    stages = stages_for("micro", Path("/tmp/x"))
    trained = {s.name for s in stages if s.name.startswith("base-")} | {e.name for e in REGISTRY if e.recipe}
    for s in stages:  # in dependency order
        if set(s.needs) & trained:
            trained.add(s.name)
    assert {"base-E1", "base-E2", "base-E3", "E1", "E2", "E3", "E4", "sample_eff", "probes"} <= trained
    assert "llama" not in trained and "reparam" not in trained
    assert {n for n in fp32 if fp32[n] != bf16[n]} == trained
    # fp32 keeps the keys it always had: the stage configs carry no precision
    assert all("precision" not in s.config.get("recipe", {}) for s in stages_for("micro", Path("/tmp/x")))
    r = RECIPES["micro"]["E3"]
    from dataclasses import replace
    assert base_key(BASE, r) != base_key(BASE, replace(r, precision="bf16"))
    assert base_key(BASE, r) == base_key(BASE, replace(r, precision="fp32"))
