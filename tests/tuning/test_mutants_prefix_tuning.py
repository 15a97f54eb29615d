"""Tests written against mutants of tuning/prefix.py that survived tests/tuning/test_methods.py,
test_prefix_fold.py and test_method_registry.py (docs/tests.md). Those use the micro preset, which
has one layer: here a 2-layer model tells "every layer" from "layer 0" and "one MLP" from "one per
layer". Every refusal's message, the recorded options, the init (scale, slot), the parameter count
for each variant with and without defaults, fold and state of a shallow prefix, and describe."""

import pytest
import torch

from prefixlab_common.errors import UserError
from tuning import Prefix
from tuning.prefix import slot_residuals
from tests.conftest import tiny_model


def _model(slots="token", n_layers=2):
    return tiny_model(n_layers=n_layers, n_prompt=3, slots=slots)


@pytest.mark.parametrize("opts, message", [
    ({"length": 0}, "prefix length P must be positive, got 0"),
    ({"share": "half"}, "unknown prefix share 'half'; use one of none, simple, deep"),
    ({"depth": "mid"}, "unknown prefix depth 'mid'; use deep (all layers) or shallow (layer 0)"),
    ({"share": "deep", "mlp": "both"}, "unknown deep-share mlp 'both'; use shared or per_layer"),
    ({"share": "deep", "hidden": 0}, "deep-share hidden width must be positive, got 0"),
    ({"length": 4}, "a prefix of length 4 does not fit the model's 3 prompt slots (pretrain with a larger "
                    "--prompt-len)"),
    ({"init": "zeros"}, "unknown prefix init 'zeros'; use one of normal, slot"),
])
def test_each_refusal_and_its_message(opts, message):
    with pytest.raises(UserError) as e:
        Prefix(_model(), **opts)
    assert str(e.value) == message


def test_slot_init_needs_a_token_slot_base():
    with pytest.raises(UserError) as e:
        Prefix(_model(slots="empty"), init="slot")
    assert str(e.value) == ("prefix init 'slot' starts from the base's own SLOT positions: it needs a base "
                            "pretrained with --slots token")
    Prefix(_model(slots="empty"))  # the normal init needs no SLOT tokens


def test_recorded_options():
    m = _model()
    assert Prefix(m).opts == {"length": 1, "share": "simple", "depth": "deep", "hidden": None, "mlp": None,
                              "init_scale": 1.0}
    assert Prefix(m, length=2, share="none", init_scale=0.5, hidden=4, mlp="per_layer").opts == {
        "length": 2, "share": "none", "depth": "deep", "hidden": None, "mlp": None, "init_scale": 0.5}
    assert Prefix(m, share="deep", init="slot").opts == {
        "length": 1, "share": "deep", "depth": "deep", "hidden": 16, "mlp": "shared", "init_scale": 1.0,
        "init": "slot"}


@pytest.mark.parametrize("scale", [None, 2.0])
def test_normal_init_is_n_0_scale_squared(scale):
    m = _model()
    kw = {} if scale is None else {"init_scale": scale}
    p = Prefix(m, length=2, generator=torch.Generator().manual_seed(3), **kw).p
    want = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(3)) * (scale or 1.0)
    assert torch.equal(p, want)


def test_slot_init_starts_at_the_base_slots_for_simple_and_none():
    m = _model()
    slot = slot_residuals(m, 2, 2)
    assert torch.equal(Prefix(m, length=2, init="slot").p.detach(), slot)
    none = Prefix(m, length=2, share="none", init="slot")
    kv = [m.blocks[l].prefix_from_residual(slot[l]) for l in range(2)]
    assert torch.equal(none.k.detach(), torch.stack([k for k, _ in kv]))
    assert torch.equal(none.v.detach(), torch.stack([v for _, v in kv]))
    # deep-share draws its p' (the offset kv0 carries the slots), here from the generator
    deep = Prefix(m, length=2, share="deep", init="slot", generator=torch.Generator().manual_seed(1))
    assert torch.equal(deep.p.detach(), torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(1))[0])


@pytest.mark.parametrize("mlp, n", [(None, 1), ("shared", 1), ("per_layer", 2)])
def test_one_mlp_shared_or_one_per_layer(mlp, n):
    assert len(Prefix(_model(), share="deep", mlp=mlp).mlps) == n


CASES = [{}, {"share": "none"}, {"share": "deep"}, {"share": "deep", "mlp": "shared"},
         {"share": "deep", "mlp": "per_layer"}, {"share": "deep", "hidden": 5}, {"length": 2, "share": "deep"},
         {"depth": "shallow"}, {"depth": "shallow", "share": "none"}, {"depth": "shallow", "share": "deep"},
         {"depth": "shallow", "share": "deep", "mlp": "per_layer", "hidden": 3}, {"depth": "deep", "length": 3}]


@pytest.mark.parametrize("opts", CASES)
def test_parameter_count_with_and_without_defaults_on_two_layers(opts):
    m = _model()
    assert Prefix.param_count(m, **opts) == Prefix(m, **opts).n_params


def test_parameter_count_by_hand():
    m = _model()  # L = 2, D = 8, H * Dh = 8, default hidden 16
    assert Prefix.param_count(m, share="none", length=2) == 2 * 2 * 8 * 2
    assert Prefix.param_count(m, share="deep") == 8 + 8 * 16 + 16 + 16 * 2 * 8 * 2 + 2 * 8 * 2
    assert Prefix.param_count(m, share="deep", mlp="per_layer") == 2 * (8 + 8 * 16 + 16 + 16 * 16 + 16)
    assert Prefix.param_count(m, depth="shallow") == 8


@pytest.mark.parametrize("share", ["none", "simple", "deep"])
def test_a_shallow_prefix_fills_layer_0_only_and_folds_shallow(share):
    m = _model()
    pre = Prefix(m, length=2, share=share, depth="shallow", generator=torch.Generator().manual_seed(2))
    st = pre.state()
    assert len(st.prefix_k) == len(st.prefix_v) == 2 and st.prefix_k[1] is None and st.prefix_v[1] is None
    folded = pre.fold()
    assert folded.opts["depth"] == "shallow" and folded.k.shape == (1, 2, 2, 4)
    fs = folded.state()
    assert fs.prefix_k[1] is None and torch.equal(fs.prefix_k[0], st.prefix_k[0].detach())


def test_describe():
    assert Prefix.describe({"share": "simple", "length": 2}) == "prefix (simple, P=2)"
    assert Prefix.describe({"share": "deep", "length": 1, "depth": "shallow"}) == "prefix (deep, P=1, shallow)"
    assert Prefix.describe({"share": "none", "length": 3, "depth": "deep"}) == "prefix (none, P=3)"


@pytest.mark.parametrize("mlp", ["shared", "per_layer"])
def test_deep_share_mlps_drawn_from_the_generator_at_std_one_over_sqrt_fan_in(mlp):
    m = _model()
    pre = Prefix(m, length=2, share="deep", mlp=mlp, hidden=5, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    assert torch.equal(pre.p.detach(), torch.randn(2, 2, 8, generator=g)[0 if mlp == "shared" else slice(None)])
    out = 2 * 8 * (2 if mlp == "shared" else 1)
    for lin in pre.mlps:
        w0 = torch.empty(5, 8).normal_(0.0, 8 ** -0.5, generator=g)
        w2 = torch.empty(out, 5).normal_(0.0, 5 ** -0.5, generator=g)
        assert torch.equal(lin[0].weight.detach(), w0) and torch.equal(lin[2].weight.detach(), w2)
        assert not lin[0].bias.any() and not lin[2].bias.any()


@pytest.mark.parametrize("mlp", ["shared", "per_layer"])
def test_deep_share_slot_init_starts_at_the_base_slots(mlp):
    m = _model()
    pre = Prefix(m, length=2, share="deep", mlp=mlp, init="slot", generator=torch.Generator().manual_seed(5))
    assert "kv0" in dict(pre.named_buffers()) and "kv0" in pre.export()
    slot = slot_residuals(m, 2, 2)
    ks, vs = pre.keys_values()
    for l in range(2):
        k, v = m.blocks[l].prefix_from_residual(slot[l])
        assert torch.equal(ks[l].detach(), k) and torch.equal(vs[l].detach(), v)
