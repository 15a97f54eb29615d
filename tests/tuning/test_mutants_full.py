"""Tests written against mutants of tuning/full.py and tuning/base.py (docs/tests.md): full
fine-tuning's copies of every weight and their names, its count, label and weight-decay split; the
base class's export, the refusal of mismatched tensors, its defaults and `positive`."""

import pytest
import torch

from prefixlab_common.errors import UserError
from tuning import FullFinetune, SoftPrompt
from tuning.base import Method, positive
from tests.conftest import tiny_model


def _model():
    return tiny_model(n_layers=2, n_prompt=2)


def test_full_finetuning_copies_every_weight_under_its_name():
    m = _model()
    ft = FullFinetune(m)
    names = dict(m.named_parameters())
    assert sorted(ft.weights) == sorted(k.replace(".", "__") for k in names)
    st = ft.state().weights
    assert sorted(st) == sorted(names)
    for k, v in names.items():
        assert torch.equal(st[k].detach(), v.detach()) and st[k].data_ptr() != v.data_ptr()
    ft.weights["blocks__0__attn__W_Q"].data += 1  # training the copy leaves the base alone
    assert not torch.equal(m.blocks[0].attn.W_Q, ft.state().weights["blocks.0.attn.W_Q"])
    n = sum(p.numel() for p in m.parameters())
    assert FullFinetune.param_count(m) == n == ft.n_params
    assert FullFinetune.describe({}) == "full fine-tuning" and ft.config() == {"name": "full"}


def test_full_finetuning_decays_matrices_but_not_embeddings_biases_or_norms():
    ft = FullFinetune(_model())
    w = torch.zeros(3, 3)
    assert not ft.no_decay("blocks.0.attn.W_Q", w)
    assert ft.no_decay("embed.W_E", w) and ft.no_decay("pos_embed.W_pos", w)
    assert ft.no_decay("blocks.0.ln1.w", torch.zeros(3)) and ft.no_decay("unembed.b_U", torch.zeros(3))
    assert not ft.no_decay("unembed.W_U", w)


def test_export_and_load_export():
    m = _model()
    sp = SoftPrompt(m, length=2)
    ex = sp.export()
    assert set(ex) == {"prompt"} and not ex["prompt"].requires_grad and torch.equal(ex["prompt"], sp.prompt)
    ex["prompt"] += 1  # a copy
    assert not torch.equal(ex["prompt"], sp.prompt)
    sp.load_export(ex)
    assert torch.equal(sp.prompt.detach(), ex["prompt"])
    for bad in ({"prompt": torch.zeros(1, 8)}, {"other": torch.zeros(2, 8)}, {}, {**ex, "x": torch.zeros(1)}):
        with pytest.raises(UserError) as e:
            sp.load_export(bad)
        assert str(e.value) == "the saved soft_prompt tensors do not match this method and base model"


def test_base_defaults():
    m = _model()

    class Bare(Method):
        name = "bare"

    b = Bare(m, a=1)
    assert b.opts == {"a": 1} and b.config() == {"name": "bare", "a": 1} and b.base is m
    assert "base" not in dict(b.named_modules()) and b.n_params == 0
    assert Bare.describe({"x": 1}) == "bare" and b.no_decay("p", torch.zeros(2, 2)) is True
    for call in (lambda: Bare.param_count(m), b.state, lambda: b.search(m, None, None, None)):
        with pytest.raises(NotImplementedError):
            call()


@pytest.mark.parametrize("value", [0, -1, None])
def test_positive_refuses_with_the_name(value):
    with pytest.raises(UserError) as e:
        positive("the width", value)
    assert str(e.value) == f"the width must be positive, got {value}"


def test_positive_gives_an_int():
    assert positive("x", 1) == 1 and type(positive("x", 3.0)) is int
