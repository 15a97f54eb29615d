"""toy_models/training.py, the evaluation and the config the loop reads: tests written against
the mutants that survived `make mutate MODULES=toy_models/training.py` (docs/tests.md). The
accuracies are recomputed by hand from the model's own logits and greedy decoding; chunking,
train/eval mode, the learning-rate formula and the data of a step are pinned."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prefixlab_common.errors import UserError
from toy_models.model import MethodState
from toy_models.tasks import Batch, TaskSpec, fixed_test_set, resolve_task, sample_batch, step_rng
from toy_models.training import TrainConfig, evaluate, loss_on, next_batch, output_logits

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A micro model trained 80 steps: right on about half the samples and 80 % of the tokens,
    so every accuracy is a fraction a wrong formula would change (dropout 0.1)."""
    from toy_models.pretraining import load_model, pretrain
    task = resolve_task("ascending", SPEC)
    path = tmp_path_factory.mktemp("eval") / "r"
    pretrain(path, "ascending", "micro", SPEC, TrainConfig(steps=80, batch_size=16, lr=3e-3, warmup=5,
                                                           eval_every=80, eval_size=64))
    model, _ = load_model(path)
    test = fixed_test_set(task, SPEC, 60)
    state = MethodState(prompt=0.1 * torch.randn(2, model.cfg.d_model, generator=torch.Generator().manual_seed(0)))
    return task, model.eval(), test, state


def test_output_logits_and_loss_are_the_last_l_positions(setup):
    _, model, test, state = setup
    L = test.y.shape[1]
    full = model(test.content, state)
    torch.testing.assert_close(output_logits(model, test, state), full[:, -L:], rtol=1e-4, atol=1e-4)
    want = F.cross_entropy(full[:, -L:].reshape(-1, full.shape[-1]), test.y.reshape(-1))
    assert loss_on(model, test, state).item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("provide_first", [False, True])
def test_evaluate_against_a_hand_computation(setup, provide_first):
    """A random micro model gets some samples and tokens right: every number of `evaluate` is
    recomputed from its logits and its own greedy decoding, and chunking changes nothing."""
    _, model, test, state = setup
    s = int(provide_first)
    L = test.y.shape[1]
    with torch.no_grad():
        pred = model(test.content, state)[:, -L:].argmax(-1)[:, s:]
        ok = pred == test.y[:, s:]
        gen = model.generate(torch.cat([test.x, test.y[:, :s]], 1), L - s, state)
    exact = ok.all(1).float().mean().item()
    assert 0 < exact < 1 and 0 < ok.float().mean().item() < 1  # the numbers are not trivial
    want = {"exact_acc": exact, "teacher_forced_token_acc": ok.float().mean().item(), "n": len(test),
            "provide_first": provide_first, "token_acc": (gen == test.y[:, s:]).float().mean().item()}
    for chunk in (500, 7, 1):
        got = evaluate(model, state, test, provide_first=provide_first, chunk=chunk)
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=1e-6), (k, chunk)
    got = evaluate(model, state, test, greedy=False, provide_first=provide_first)
    assert "token_acc" not in got and got["exact_acc"] == pytest.approx(exact, abs=1e-6)


def test_evaluate_runs_in_eval_mode_and_restores_the_mode(setup):
    _, model, test, state = setup  # dropout 0.1: a training-mode forward would differ
    ref = evaluate(model, state, test)
    model.train()
    try:
        assert evaluate(model, state, test) == ref
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    evaluate(model, state, test)
    assert not model.training


@pytest.mark.parametrize("name", ["steps", "batch_size", "eval_every", "eval_size"])
def test_train_config_positive_counts_and_their_messages(name):
    TrainConfig(**{name: 1})
    dashed = name.replace("_", "-")
    with pytest.raises(UserError, match=re.escape(f"{dashed} must be positive, got 0")):
        TrainConfig(**{name: 0})


def test_train_config_other_limits_and_messages():
    for kw, msg in [(dict(lr=0.0), "lr must be positive, got 0.0"), (dict(warmup=-1), "warmup must be >= 0, got -1"),
                    (dict(train_size=0), "train-size must be positive, got 0"),
                    (dict(schedule="linear"), "unknown schedule 'linear'; use cosine, constant or decay")]:
        with pytest.raises(UserError, match=re.escape(msg)):
            TrainConfig(**kw)
    TrainConfig(warmup=0, lr=1e-9, train_size=1, schedule="constant")
    c = TrainConfig(steps=7, lr=0.5, stop_at=0.9)
    assert TrainConfig.from_dict({**c.to_dict(), "unknown_old_field": 3}) == c


def test_learning_rate_formula():
    c = TrainConfig(steps=110, lr=2.0, warmup=10, min_lr_frac=0.2)
    assert [c.lr_at(s) for s in (0, 4, 9)] == pytest.approx([0.2, 1.0, 2.0])
    for s in (10, 35, 60, 85, 109, 110):
        t = (s - 10) / 100
        assert c.lr_at(s) == pytest.approx(2.0 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * t)))), s
    assert c.lr_at(60) == pytest.approx(2.0 * 0.6)  # halfway: the mean of lr and min lr
    # warmup as long as the run: the cosine part divides by max(1, 0)
    assert TrainConfig(steps=5, lr=1.0, warmup=5, min_lr_frac=0.0).lr_at(6) == pytest.approx(0.5 * (1 + math.cos(math.pi)))
    k = TrainConfig(steps=50, lr=0.3, warmup=4, schedule="constant")
    assert [k.lr_at(s) for s in (0, 3, 4, 49)] == pytest.approx([0.075, 0.3, 0.3, 0.3])
    z = TrainConfig(steps=50, lr=0.3, warmup=0)
    assert z.lr_at(0) == pytest.approx(0.3)


def test_next_batch_is_the_steps_own_draw():
    task = resolve_task("add1", SPEC)
    cfg = TrainConfig(batch_size=6, seed=9)
    b = next_batch(task, SPEC, cfg, 4, None)
    want = sample_batch(task, SPEC, 6, step_rng(9, 4))
    assert torch.equal(b.x, want.x) and torch.equal(b.y, want.y)
    assert not torch.equal(next_batch(task, SPEC, cfg, 5, None).x, b.x)
    pool = sample_batch(task, SPEC, 4, step_rng(0, 0, stream=1))
    got = next_batch(task, SPEC, cfg, 4, pool)  # a pool smaller than the batch: its size
    idx = torch.from_numpy(step_rng(9, 4).integers(0, 4, size=4))
    assert torch.equal(got.x, pool.x[idx]) and torch.equal(got.y, pool.y[idx]) and torch.equal(got.which, pool.which[idx])
    big = sample_batch(task, SPEC, 20, step_rng(0, 0, stream=1))
    got = next_batch(task, SPEC, cfg, 2, big)
    idx = torch.from_numpy(step_rng(9, 2).integers(0, 20, size=6))
    assert torch.equal(got.x, big.x[idx])


def test_decay_schedule_is_constant_then_linear_to_min_lr():
    # 10 steps, decay over the last 20 % (steps 8 and 9) to min_lr_frac = 0.1: the last step reaches it
    c = TrainConfig(steps=10, lr=2.0, warmup=0, schedule="decay", decay_frac=0.2, min_lr_frac=0.1)
    assert [c.lr_at(s) for s in range(10)] == pytest.approx([2.0] * 8 + [2.0 * 0.55, 2.0 * 0.1])
    # the warmup comes first, the decay window is counted from the end of the run
    w = TrainConfig(steps=100, lr=1.0, warmup=10, schedule="decay", decay_frac=0.5, min_lr_frac=0.0)
    assert [w.lr_at(s) for s in (0, 9, 10, 49, 50, 74, 99)] == pytest.approx([0.1, 1.0, 1.0, 1.0, 0.98, 0.5, 0.0])
    # a window shorter than one step still decays the last step
    assert TrainConfig(steps=10, lr=1.0, warmup=0, schedule="decay", decay_frac=0.01).lr_at(9) == pytest.approx(0.1)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(UserError, match="decay-frac must be in"):
            TrainConfig(schedule="decay", decay_frac=bad)
