"""Tests written against mutants of tuning/soft_prompt.py (docs/tests.md): every refusal and its
message with the edges allowed, each init against a hand computation with the same generator, the
recorded options, the parameter count with and without defaults, describe and the hard prompt's
state."""

import pytest
import torch

from prefixlab_common.errors import UserError
from tuning import SoftPrompt, hard_prompt_state
from tests.conftest import tiny_model


def _model():
    return tiny_model(n_layers=1, n_prompt=3)


@pytest.mark.parametrize("opts, message", [
    ({"init": "tokens"}, "soft prompt init 'tokens' needs --tokens, e.g. --tokens 11,11"),
    ({"init": "tokens", "tokens": []}, "soft prompt init 'tokens' needs --tokens, e.g. --tokens 11,11"),
    ({"init": "tokens", "tokens": [0, 12]}, "prompt tokens must be in 0..11"),
    ({"init": "tokens", "tokens": [-1]}, "prompt tokens must be in 0..11"),
    ({"length": 0}, "prompt length P must be positive, got 0"),
    ({"length": 4}, "a prompt of length 4 does not fit the model's 3 prompt slots (pretrain with a larger "
                    "--prompt-len)"),
    ({"init": "tokens", "tokens": [1, 2, 3, 4]}, "a prompt of length 4 does not fit the model's 3 prompt slots "
                                                "(pretrain with a larger --prompt-len)"),
    ({"init": "zeros"}, "unknown soft prompt init 'zeros'; use random, vocab or tokens"),
])
def test_each_refusal_and_its_message(opts, message):
    with pytest.raises(UserError) as e:
        SoftPrompt(_model(), **opts)
    assert str(e.value) == message


def test_each_init_by_hand():
    m = _model()
    W_E = m.embed.W_E.detach()
    sp = SoftPrompt(m, generator=torch.Generator().manual_seed(1))  # defaults: length 1, random
    assert sp.opts == {"length": 1, "init": "random", "tokens": []}
    assert torch.equal(sp.prompt.detach(), torch.randn(1, 8, generator=torch.Generator().manual_seed(1)) * W_E.std())
    sp = SoftPrompt(m, length=3, init="vocab", generator=torch.Generator().manual_seed(2))
    rows = torch.randint(0, 12, (3,), generator=torch.Generator().manual_seed(2))
    assert torch.equal(sp.prompt.detach(), W_E[rows]) and sp.opts == {"length": 3, "init": "vocab", "tokens": []}
    # tokens: the given tokens' rows (the edges 0 and V - 1 allowed), their count is P
    sp = SoftPrompt(m, length=1, init="tokens", tokens=[0, 11])
    assert torch.equal(sp.prompt.detach(), W_E[[0, 11]]) and sp.opts == {"length": 2, "init": "tokens",
                                                                         "tokens": [0, 11]}
    sp.prompt.data += 1  # a copy: training it leaves the base alone
    assert torch.equal(m.embed.W_E.detach(), W_E)
    assert sp.state().prompt is sp.prompt


def test_parameter_count():
    m = _model()
    assert SoftPrompt.param_count(m) == 8 == SoftPrompt(m).n_params
    assert SoftPrompt.param_count(m, length=3) == 24
    assert SoftPrompt.param_count(m, length=1, init="tokens", tokens=[1, 2]) == 16
    assert SoftPrompt.param_count(m, length=2, init="random", tokens=[1, 2, 3]) == 16
    assert SoftPrompt.param_count(m, length=2, init="tokens") == 16


def test_describe_and_hard_prompt_state():
    assert SoftPrompt.describe({"length": 2}) == "soft prompt (P=2)"
    m = _model()
    for toks in ([3, 0], torch.tensor([3, 0])):
        assert torch.equal(hard_prompt_state(m, toks).prompt, m.embed.W_E[[3, 0]])
