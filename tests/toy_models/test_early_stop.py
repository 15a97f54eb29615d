"""The early stop on a validation plateau (TrainConfig.patience, toy_models.training.Plateau):
it stops at the evaluation the rule names, ends on the tensors of its best evaluation, resumes
to the uninterrupted result, and a run that stops inside a fused group ends as it does alone."""

import json
import math

import pytest
import torch

from prefixlab_common.errors import UserError
from toy_models.batched import Member, fit_many
from toy_models.model import preset_config
from toy_models.pretraining import build_model
from toy_models.runs import RunDir, load_tensors
from toy_models.tasks import TaskSpec, resolve_task
from toy_models.training import Plateau, Trainable, TrainConfig, fit
from tuning.fused import finetune_many
from tuning.pipeline import finetune

from tests.tuning.conftest import pretrain_micro_add1

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)
# a constant rate without warm-up: a run of N steps is the first N steps of any longer run
BASE_CFG = {"steps": 40, "batch_size": 16, "lr": 3e-3, "schedule": "constant", "warmup": 0, "eval_every": 5,
            "eval_size": 64, "val_size": 48}


class Interrupt(Exception):
    pass


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**BASE_CFG, **kw})


def micro():
    model = build_model(preset_config("micro", d_vocab=SPEC.vocab_size, n_ctx=SPEC.n_ctx, n_prompt=SPEC.prompt_len,
                                      dropout=0.1), 0)
    return model, Trainable(dict(model.named_parameters()), lambda: None,
                            no_decay=lambda n, p: p.ndim < 2 or n.endswith(("W_E", "W_pos")))


def train(path, c: TrainConfig, via: str = "fit", resume: bool = False, interrupt_at: int | None = None):
    """One micro run of `c` by `fit` or by `fit_many` (one member): its result (timing dropped),
    final tensors and the steps its progress saw."""
    model, tr = micro()
    run, steps = RunDir(path), []
    run.path.mkdir(exist_ok=True)

    def progress(step, total, info):
        steps.append(step)
        if step == interrupt_at:
            raise Interrupt

    task = resolve_task("add1", SPEC)
    if via == "fit":
        result = fit(model, tr, task, SPEC, c, run=run, resume=resume, progress=progress)
    else:
        result = fit_many(model, [Member(tr, task, c, run, resume)], SPEC, progress)[0]
    result.pop("timing")
    return result, {k: v.detach().clone() for k, v in tr.params.items()}, steps


def scripted(monkeypatch, losses: dict[int, float]):
    """Validation losses by step instead of measured ones (the rule alone under test)."""
    monkeypatch.setattr(Plateau, "update", lambda self, model, tr, step: self.record(losses[step], step, tr))


def test_the_rule_counts_evaluations_without_progress_and_keeps_the_lowest():
    """patience 2, min_delta 0.05: 0.79 is the lowest loss but not progress (not below 0.8 − 0.05),
    so it counts, and so does 0.81: the run stops at its 4th evaluation and keeps the 3rd's tensors."""
    tr = Trainable({"w": torch.nn.Parameter(torch.zeros(2))}, lambda: None)
    p = Plateau(cfg(patience=2, min_delta=0.05), resolve_task("add1", SPEC), SPEC, tr)
    seen = []
    for step, loss in zip((5, 10, 15, 20), (1.0, 0.8, 0.79, 0.81)):
        with torch.no_grad():
            tr.params["w"].fill_(step)
        p.record(loss, step, tr)
        seen.append((p.bad, p.stopped))
    assert seen == [(0, False), (0, False), (1, False), (2, True)]
    assert (p.best_step, p.best) == (15, 0.79)
    with torch.no_grad():
        tr.params["w"].fill_(-1)
    p.restore(tr)
    assert torch.equal(tr.params["w"], torch.full((2,), 15.0))


@pytest.mark.parametrize("via", ["fit", "batched"])
def test_a_plateau_stops_the_run_on_its_best_evaluation(tmp_path, monkeypatch, via):
    """Losses 1.0, 0.6, 0.7, 0.9 (patience 2): stop at step 20, end on step 10's tensors: exactly
    the tensors and test metrics of the same run trained 10 steps without the option."""
    scripted(monkeypatch, {5: 1.0, 10: 0.6, 15: 0.7, 20: 0.9})
    result, params, steps = train(tmp_path / "stop", cfg(patience=2), via)
    assert steps == list(range(1, 21))
    assert (result["steps"], result["best_step"], result["val_loss"]) == (20, 10, 0.6)
    rows = [json.loads(x) for x in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["val_loss"]) for r in rows] == [(5, 1.0), (10, 0.6), (15, 0.7), (20, 0.9)]
    short, short_params, _ = train(tmp_path / "short", cfg(steps=10), via)
    assert all(torch.equal(params[k], short_params[k]) for k in params)
    assert {k: result[k] for k in ("exact_acc", "token_acc")} == {k: short[k] for k in ("exact_acc", "token_acc")}


def test_measured_losses_on_a_frozen_run_stop_after_patience(tmp_path):
    """A rate too small to move the loss by min_delta: the first evaluation sets the reference and
    the next `patience` do not beat it, so the run stops at eval_every × (1 + patience)."""
    result, _, _ = train(tmp_path / "r", cfg(lr=1e-9, patience=3, min_delta=1e-3))
    assert result["steps"] == 20 and result["best_step"] in (5, 10, 15, 20) and math.isfinite(result["val_loss"])


@pytest.mark.parametrize("first,then", [("fit", "fit"), ("fit", "batched"), ("batched", "fit")])
@pytest.mark.parametrize("at", [15, 30], ids=["before-the-stop", "at-the-stop"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, first, then, at):
    """Killed after a checkpoint before the stop, or after the stop's own checkpoint but before it
    finished, a run resumed by either loop ends with the uninterrupted run's steps, tensors and
    metrics (the rule's state and the kept tensors are in the checkpoint)."""
    scripted(monkeypatch, {5: 1.0, 10: 0.8, 15: 0.5, 20: 0.6, 25: 0.55, 30: 0.7})
    c = cfg(patience=3, min_delta=0.01)
    full, full_params, _ = train(tmp_path / "full", c)
    assert (full["steps"], full["best_step"]) == (30, 15)
    with pytest.raises(Interrupt):
        train(tmp_path / "cut", c, first, interrupt_at=at)
    resumed, params, steps = train(tmp_path / "cut", c, then, resume=True)
    assert resumed == full and steps == list(range(at + 1, 31))
    assert all(torch.equal(params[k], full_params[k]) for k in params)
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()


def test_the_option_is_validated_and_absent_from_configs_without_it():
    with pytest.raises(UserError, match="patience must be positive"):
        cfg(patience=0)
    with pytest.raises(UserError, match="min-delta"):
        cfg(patience=2, min_delta=-1.0)
    assert not {"patience", "min_delta", "val_size"} & set(cfg().to_dict())  # runs without it keep their configs
    d = cfg(patience=4, min_delta=1e-3).to_dict()
    assert (d["patience"], d["min_delta"], d["val_size"]) == (4, 1e-3, 48)
    assert TrainConfig.from_dict(d) == cfg(patience=4, min_delta=1e-3)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return pretrain_micro_add1(tmp_path_factory, 60)


def test_a_run_that_stops_inside_a_fused_group_ends_as_it_does_alone(base, tmp_path):
    """Three prefix runs fused in one group, one frozen by a tiny rate (it stops at step 8 on its
    plateau) and two that learn: the one that stops leaves the group, the others go on, and each
    ends with what it gets alone (steps, best step, metrics, tensors, within fp32 rounding)."""
    train = {"steps": 24, "batch_size": 16, "schedule": "constant", "warmup": 0, "eval_every": 2, "eval_size": 32,
             "patience": 3, "min_delta": 1e-3, "val_size": 32}
    lrs = [1e-9, 3e-2, 1e-2]
    jobs = [dict(method="prefix", task="ascending", out=tmp_path / "fused" / f"r{i}", opts={"length": 2},
                 train={**train, "lr": lr}, seed=i) for i, lr in enumerate(lrs)]
    calls = []
    fused = finetune_many(base, jobs, progress=lambda s, n, info: calls.append(info.get("runs", 1)))
    assert calls[0] == 3 and calls[-1] < 3, "the group shrinks when a run stops"
    assert fused[0]["steps"] == 8 and max(m["steps"] for m in fused[1:]) > 8
    for job, m in zip(jobs, fused):
        alone = finetune(base, "prefix", job["task"], tmp_path / "alone" / job["out"].name, job["opts"],
                         {**job["train"], "seed": job["seed"]})
        assert (m["steps"], m["best_step"]) == (alone["steps"], alone["best_step"])
        assert m["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-5)
        assert m["exact_acc"] == alone["exact_acc"] and m["token_acc"] == alone["token_acc"]
        got, want = (load_tensors(d / "method.safetensors") for d in (job["out"], tmp_path / "alone" / job["out"].name))
        assert got.keys() == want.keys()
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
        config = json.loads((job["out"] / "config.json").read_text())
        assert config["train"]["patience"] == 3 and config["train"]["min_delta"] == 1e-3
