"""Tests written against mutants of tuning/prompt.py (docs/tests.md), on an untrained micro model
(nothing is trained here): every refusal and its message with the edges allowed, the recorded
options and the SLOT start, the loss of each candidate against a hand computation (chunked or
not, in eval mode), the exhaustive search against every prompt scored by hand, the greedy search
against a reference implementation (tokens, loss and the number of prompts scored), and the
search's record."""

import itertools
import time

import pytest
import torch
import torch.nn.functional as F

from prefixlab_common.errors import UserError
from toy_models.model import MethodState, ToyTransformer, preset_config
from toy_models.tasks import TaskSpec, resolve_task, sample_batch, step_rng
from toy_models.training import TrainConfig
from tuning import HardPrompt
from tuning.prompt import exhaustive_search, greedy_search, prompt_losses, search_batch

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)


def _model(dropout=0.0):
    torch.manual_seed(0)
    cfg = preset_config("micro", d_vocab=SPEC.vocab_size, n_ctx=SPEC.n_ctx, n_prompt=SPEC.prompt_len,
                        dropout=dropout)
    m = ToyTransformer(cfg).eval()
    m.requires_grad_(False)
    return m


def _batch(n=6, seed=1):
    task = resolve_task("descending", SPEC)
    return sample_batch(task, SPEC, n, step_rng(seed, 0, stream=1))


V = SPEC.vocab_size


@pytest.mark.parametrize("opts, message", [
    ({"search": "random"}, "unknown prompt search 'random'; use one of auto, exhaustive, greedy"),
    ({"tokens": [1], "search": "greedy"}, "--tokens gives the prompt: it is not searched (drop --search)"),
    ({"tokens": [1], "search": "exhaustive"}, "--tokens gives the prompt: it is not searched (drop --search)"),
    ({"tokens": [0, V]}, f"prompt tokens must be in 0..{V - 1}"),
    ({"tokens": [-1]}, f"prompt tokens must be in 0..{V - 1}"),
    ({"length": 0}, "prompt length P must be positive, got 0"),
    ({"length": 4}, "a prompt of length 4 does not fit the model's 3 prompt slots (pretrain with a larger "
                    "--prompt-len)"),
    ({"tokens": [1, 2, 3, 4]}, "a prompt of length 4 does not fit the model's 3 prompt slots (pretrain with a "
                               "larger --prompt-len)"),
    ({"max_candidates": 0}, "--max-candidates must be positive, got 0"),
    ({"sweeps": 0}, "--sweeps must be positive, got 0"),
    ({"length": 2, "search": "exhaustive", "max_candidates": V * V - 1},
     f"an exhaustive search of P=2 scores V^P = {V * V:,} prompts, over --max-candidates {V * V - 1:,}: raise it "
     "or use --search greedy"),
])
def test_each_refusal_and_its_message(opts, message):
    with pytest.raises(UserError) as e:
        HardPrompt(_model(), **opts)
    assert str(e.value) == message


def test_options_start_and_state():
    m = _model()
    hp = HardPrompt(m)
    assert hp.opts == {"length": 1, "tokens": [], "search": "auto", "max_candidates": 20_000, "sweeps": 3}
    assert hp.tokens.tolist() == [V - 1] and hp.tokens.dtype == torch.long  # the SLOT token
    hp = HardPrompt(m, length=2, search="exhaustive", max_candidates=V * V, sweeps=1)  # exactly V^P: allowed
    assert hp.tokens.tolist() == [V - 1, V - 1]
    assert hp.opts == {"length": 2, "tokens": [], "search": "exhaustive", "max_candidates": V * V, "sweeps": 1}
    hp = HardPrompt(m, length=3, tokens=[0, V - 1])  # the edges allowed; the tokens set P
    assert hp.tokens.tolist() == [0, V - 1] and hp.opts["length"] == 2 and hp.opts["tokens"] == [0, V - 1]
    assert torch.equal(hp.state().prompt, m.embed.W_E[[0, V - 1]])
    assert HardPrompt.param_count(m, length=3) == 0 == hp.n_params
    assert HardPrompt.describe({"length": 2}) == "hard prompt (P=2)"


def _by_hand(model, cands, batch):
    L = batch.y.shape[1]
    out = []
    for c in cands:
        logits = model(batch.content, MethodState(prompt=model.embed.W_E[c].expand(len(batch), -1, -1)), last=L)
        out.append(F.cross_entropy(logits.reshape(-1, V), batch.y.reshape(-1)))
    return torch.stack(out)


@pytest.mark.parametrize("max_rows", [8192, 1, 12])
def test_prompt_losses_by_hand_in_any_chunking(max_rows):
    m, b = _model(dropout=0.5), _batch()
    cands = torch.tensor([[0, 1], [5, 5], [V - 1, 2], [3, 0], [6, 4]])
    want = _by_hand(m, cands, b)  # eval mode: dropout off
    m.train()
    got = prompt_losses(m, cands, b, max_rows=max_rows)
    assert not m.training and got.shape == (5,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_exhaustive_search_takes_the_first_least_loss():
    m, b = _model(), _batch()
    best, loss, n = exhaustive_search(m, b, 1)
    losses = _by_hand(m, torch.arange(V)[:, None], b)
    assert n == V and best.tolist() == [int(torch.argmin(losses))]
    assert loss == pytest.approx(float(losses.min()), rel=1e-6)
    best, loss, n = exhaustive_search(m, b, 2)
    cands = torch.tensor(list(itertools.product(range(V), repeat=2)))
    losses = prompt_losses(m, cands, b)
    assert n == V * V and best.tolist() == cands[int(torch.argmin(losses))].tolist()
    # ties: the first in lexicographic order (every row of W_E the same: every prompt scores alike)
    m.embed.W_E[:] = m.embed.W_E[3]
    assert exhaustive_search(m, b, 1)[0].tolist() == [0] and exhaustive_search(m, b, 2)[0].tolist() == [0, 0]


def _greedy_by_hand(model, batch, start, sweeps):
    cur = start.tolist()
    loss = float(prompt_losses(model, torch.tensor([cur]), batch)[0])
    scored = 1
    for _ in range(sweeps):
        changed = False
        for pos in range(len(cur)):
            trial = []
            for t in range(V):
                c = list(cur)
                c[pos] = t
                trial.append(c)
            losses = prompt_losses(model, torch.tensor(trial), batch)
            scored += V
            i = int(torch.argmin(losses))
            if float(losses[i]) < loss:
                cur, loss, changed = trial[i], float(losses[i]), True
        if not changed:
            break
    return cur, loss, scored


@pytest.mark.parametrize("P, sweeps, start", [(1, 3, [V - 1]), (2, 3, [V - 1, V - 1]), (3, 1, [0, 0, 0]),
                                              (2, 5, [3, 3])])
def test_greedy_search_against_a_reference(P, sweeps, start):
    m, b = _model(), _batch()
    cur, loss, scored = greedy_search(m, b, torch.tensor(start), sweeps)
    want = _greedy_by_hand(m, b, torch.tensor(start), sweeps)
    assert (cur.tolist(), scored) == (want[0], want[2]) and loss == pytest.approx(want[1], rel=1e-6)
    assert scored < 1 + V * P * sweeps or sweeps == 1  # these converge before their last sweep


def test_search_batch_is_the_training_pool():
    task = resolve_task("descending", SPEC)
    for cfg, n in ((TrainConfig(batch_size=8, seed=2), 8), (TrainConfig(batch_size=8, seed=2, train_size=5), 5)):
        b = search_batch(task, SPEC, cfg)
        want = sample_batch(task, SPEC, n, step_rng(2, 0, stream=1))
        assert len(b) == n and torch.equal(b.x, want.x) and torch.equal(b.y, want.y)


@pytest.mark.parametrize("opts, kind, candidates", [
    ({"tokens": [3, 1]}, "given", 1), ({"length": 1}, "exhaustive", V), ({"length": 2}, "exhaustive", V * V),
    ({"length": 2, "max_candidates": V * V - 1}, "greedy", None), ({"length": 2, "max_candidates": V * V}, "exhaustive", V * V),
    ({"length": 1, "search": "greedy"}, "greedy", None), ({"length": 1, "search": "exhaustive"}, "exhaustive", V)])
def test_the_search_record(opts, kind, candidates):
    m = _model()
    task = resolve_task("descending", SPEC)
    cfg = TrainConfig(batch_size=6, seed=1)
    hp = HardPrompt(m, **opts)
    start = hp.tokens.clone()
    t0 = time.perf_counter()
    rec = hp.search(m, task, SPEC, cfg)
    took = time.perf_counter() - t0
    b = search_batch(task, SPEC, cfg)
    assert rec["kind"] == kind and rec["batch"] == 6 and rec["tokens"] == hp.tokens.tolist()
    if kind == "given":
        assert rec["tokens"] == [3, 1]
    if kind == "greedy":
        cur, loss, scored = greedy_search(m, b, start, hp.opts["sweeps"])
        candidates = scored
        assert rec["tokens"] == cur.tolist()
    assert rec["candidates"] == candidates and 0 <= rec["seconds"] <= took
    assert rec["train_loss"] == pytest.approx(float(prompt_losses(m, hp.tokens[None], b)[0]), rel=1e-6)
    assert set(rec) == {"kind", "tokens", "train_loss", "candidates", "batch", "seconds"}
