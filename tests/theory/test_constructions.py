"""[P] §3's single-virtual-token constructions (docs/papers.md §5) on the lab's own ToyTransformer."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from theory.constructions import (
    Layout, build_thm1_model, build_thm2_model, capacity_count, capacity_model, encode_text,
    min_beta, parse_map, predicted_min_beta, thm1_check, thm1_text, thm1_virtual_token, thm2_check,
    thm2_virtual_token, START_TOKEN,
)
from prefixlab_common.errors import UserError
from toy_models.model import MethodState, ToyTransformer

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def generate(model, Y):
    Y = torch.as_tensor(Y)
    Y = Y if Y.ndim == 2 else Y[None]
    start = torch.full((Y.shape[0], 1), START_TOKEN)
    return model.generate(start, Y.shape[1], MethodState(prompt=thm1_virtual_token(model, Y)))


@pytest.mark.parametrize("V,N", [(2, 1), (7, 3), (94, 20), (95, 20)])
def test_thm1_exact_on_random_targets(V, N):
    model = build_thm1_model(V, N)
    Y = torch.randint(0, V, (300, N), generator=torch.Generator().manual_seed(V * 100 + N))
    Y[0] = V - 1  # the worst case for the soft heads
    Y[1] = 0
    assert torch.equal(generate(model, Y), Y)


def test_thm1_with_content_onehot_and_longer_context():
    model = build_thm1_model(11, 6, n_ctx=9, content_onehot=True)
    Y = torch.randint(0, 11, (50, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(model, Y), Y)
    assert torch.equal(generate(model, Y[:, :4]), Y[:, :4])  # shorter targets use fewer coordinates


@SETTINGS
@given(V=st.integers(2, 128), N=st.integers(1, 24), seed=st.integers(0, 2**31 - 1))
def test_thm1_property_any_target(V, N, seed):
    model = build_thm1_model(V, N)
    Y = torch.randint(0, V, (8, N), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(generate(model, Y), Y)


def test_perturbed_virtual_token_fails():
    V, N = 94, 20
    model = build_thm1_model(V, N)
    Y = torch.randint(0, V - 1, (N,), generator=torch.Generator().manual_seed(3))
    token = thm1_virtual_token(model, Y)
    i = model.construction.offsets["coords"] + 7
    token[0, i] += 1.0 / V  # coordinate 7 now encodes y_7 + 1
    out = model.generate(torch.full((1, 1), START_TOKEN), N, MethodState(prompt=token))[0]
    expected = Y.clone()
    expected[7] += 1
    assert torch.equal(out, expected) and not torch.equal(out, Y)
    # the same with a random direction of norm 0.1: some coordinate must change
    noisy = thm1_virtual_token(model, Y) + 0.1 * torch.nn.functional.normalize(
        torch.randn(1, model.cfg.d_model, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert not torch.equal(model.generate(torch.full((1, 1), START_TOKEN), N,
                                          MethodState(prompt=noisy))[0], Y)


def test_soft_heads_fail_and_min_beta_matches_closed_form():
    V, N = 10, 5
    check = thm1_check(V, N, n_targets=1000, seed=0, beta=3.0, search_beta=True)
    assert check.success_rate < 1.0 and check.failures  # the check can fail
    assert check.min_beta is not None
    # the bisection's targets include the worst case (some y_N = V - 1), so it meets the formula
    assert abs(check.min_beta - predicted_min_beta(V, N)) < 0.02
    good = thm1_check(V, N, n_targets=1000, seed=0, beta=check.min_beta + 0.02, search_beta=False)
    assert good.n_success == 1000 and good.failures == []
    json.dumps(good.to_json())


def test_min_beta_standalone_and_none_when_unreachable():
    assert min_beta(5, 3, n_targets=200, seed=1) <= predicted_min_beta(5, 3) + 0.01
    assert min_beta(5, 3, n_targets=200, seed=1, hi=1.0) is None


def test_thm1_model_is_a_hooked_toy_transformer():
    model = build_thm1_model(12, 4)
    assert isinstance(model, ToyTransformer) and model.cfg.n_layers == 1 and model.cfg.n_heads == 2
    Y = torch.tensor([[3, 11, 0, 7]])
    content = torch.cat([torch.tensor([[START_TOKEN]]), Y[:, :-1]], dim=1)
    logits, cache = model.run_with_cache(content, state=MethodState(prompt=thm1_virtual_token(model, Y)))
    for name in ("hook_embed", "hook_pos_embed", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z",
                 "blocks.0.ln2.hook_normalized", "blocks.0.mlp.hook_post", "blocks.0.hook_resid_post",
                 "ln_final.hook_normalized"):
        assert name in cache, name
    pattern = cache["blocks.0.attn.hook_pattern"][0]  # [head, query, key], key 0 = virtual token
    assert torch.all(pattern[0, :, 0] > 1 - 1e-6)  # head 0 copies the virtual token
    assert torch.allclose(pattern[1].diagonal(), torch.ones(5), atol=1e-6)  # head 1 reads its own position
    assert torch.equal(logits[0, 1:].argmax(-1), Y[0])
    # the extracted coordinate, before the final LayerNorm's positive scale, is y / V times s
    o = model.construction.offsets
    resid = cache["blocks.0.hook_resid_post"][0, 1:]
    assert torch.allclose(resid[:, o["z"]] / resid[:, o["c"]], Y[0].float() / 12, atol=1e-5)


def test_thm1_text_round_trip_and_alphabet():
    r = thm1_text("I love transformers!")
    assert r.exact and r.generated == "I love transformers!" and r.V == 95 and r.N == 20
    assert thm1_text(" ~!").exact
    with pytest.raises(UserError, match="'é'"):
        encode_text("café")
    with pytest.raises(UserError, match="outside the alphabet"):
        thm1_text("tab\there")
    with pytest.raises(UserError):
        thm1_text("")


def test_bad_inputs_are_user_errors():
    model = build_thm1_model(10, 4)
    with pytest.raises(UserError, match="larger than the model's N=4"):
        thm1_virtual_token(model, [1, 2, 3, 4, 5])
    with pytest.raises(UserError, match="outside the vocabulary"):
        thm1_virtual_token(model, [1, 10])
    with pytest.raises(UserError, match="larger than the context"):
        build_thm1_model(10, 8, n_ctx=5)
    with pytest.raises(UserError):
        build_thm1_model(1, 4)
    with pytest.raises(UserError):
        build_thm1_model(10, 4, beta=-1.0)
    with pytest.raises(UserError, match="Theorem 2"):
        thm2_virtual_token(model, [0] * 10)
    with pytest.raises(UserError):
        thm1_check(10, 4, n_targets=0)
    for bad in ("", "1,x", "0:1,1", "0:1,0:2", "0:1,2:0", "1,,2"):
        with pytest.raises(UserError):
            parse_map(bad)
    with pytest.raises(UserError, match="outside 0..2"):
        parse_map("1,0,3")
    with pytest.raises(UserError, match="needs 4 values"):
        parse_map("1,0,2", V=4)
    with pytest.raises(UserError, match="needs 3 values"):
        thm2_check(3, mapping=[0, 1])
    with pytest.raises(UserError, match="outside 0..2"):
        thm2_check(3, mapping=[0, 1, 5])


def test_parse_map_forms():
    assert parse_map("1,0,2") == [1, 0, 2]
    assert parse_map("2:2, 0:1, 1:0") == [1, 0, 2]
    assert parse_map("0:0,1:0", V=2) == [0, 0]


@pytest.mark.parametrize("V", [2, 3, 17, 64])
def test_thm2_random_maps(V):
    r = thm2_check(V, n_maps=100, seed=V)
    assert r.n_exact_maps == 100 and r.to_json()["all_exact"]


def test_thm2_given_map_and_all_maps_for_V3():
    assert thm2_check(5, mapping=parse_map("4,4,0,1,3")).n_exact_maps == 1
    model = build_thm2_model(3)
    maps = torch.cartesian_prod(*[torch.arange(3)] * 3)  # all 27 maps [3] -> [3]
    prompt = thm2_virtual_token(model, maps).repeat_interleave(3, dim=0)
    x = torch.arange(3).repeat(27).unsqueeze(1)
    out = model.generate(x, 1, MethodState(prompt=prompt)).view(27, 3)
    assert torch.equal(out, maps)


def test_capacity_count_virtual_reaches_more():
    model = capacity_model(seed=0, d_vocab=8, d_model=16, n_layers=1, n_heads=2, n_ctx=8)
    c = capacity_count(model, k=6, n_virtual=500, seed=0)
    assert c.hard_distinct <= c.n_hard == 8
    assert c.virtual_distinct > c.hard_distinct
    json.dumps(c.to_json())
    with pytest.raises(UserError, match="does not fit"):
        capacity_count(model, k=20)
