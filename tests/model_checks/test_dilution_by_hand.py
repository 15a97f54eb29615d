"""The dilution probe's prefix mass pinned by hand for P >= 2 slots, on LLaMA and on Gemma 3.

With every layer's query projection zeroed, every score is 0, so each query attends uniformly to
the keys it may see: content query i (at position P + i) sees the P prefix slots and content 0..i
on a global layer, so α_i = P / (P + i + 1), the mass *summed* over the P slots (a probe that
averages the slots reports α_i / P). On a sliding layer of window 6 it sees the positions > P + i − 6.
α(L) is the mean over the last ceil(L/8) queries: i = L − 1 for L <= 8, i = 14 and 15 for L = 16.
The expected values below are worked out by hand from that, not by the code under test."""

from __future__ import annotations

import pytest
import torch

from model_checks.dilution import dilution_loaded
from model_checks.models import tiny_gemma3, tiny_llama
from model_checks.prefix import CachePrefix

LENGTHS = [4, 5, 8, 16]

# global layers (and every LLaMA layer): P / (P + i + 1)
GLOBAL = {
    2: [2 / 6, 2 / 7, 2 / 10, (2 / 17 + 2 / 18) / 2],
    3: [3 / 7, 3 / 8, 3 / 11, (3 / 18 + 3 / 19) / 2],
}
# sliding layers, window 6: query i sees the slots at positions > P + i − 6 and at most 6 keys in all
#   P = 2: i = 3 sees slots 0, 1 of 6 keys (1/3); i = 4 sees slot 1 of 6 (1/6); i >= 5 sees none
#   P = 3: i = 3 sees slots 1, 2 of 6 (1/3);    i = 4 sees slot 2 of 6 (1/6); i >= 5 sees none
SLIDING = {2: [1 / 3, 1 / 6, 0.0, 0.0], 3: [1 / 3, 1 / 6, 0.0, 0.0]}


def _uniform(loaded):
    with torch.no_grad():
        for layer in loaded.model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    return loaded


def _prefix(n_layers, kv, d, P):
    g = torch.Generator().manual_seed(P)
    return CachePrefix([torch.randn(kv, P, d, generator=g) for _ in range(n_layers)],
                  [torch.randn(kv, P, d, generator=g) for _ in range(n_layers)], {"source": "given"})


@pytest.mark.parametrize("P", [2, 3])
def test_llama_prefix_mass_is_summed_over_the_slots(P):
    loaded = _uniform(tiny_llama(seed=0, gqa=True))
    d = dilution_loaded(loaded, _prefix(2, 2, 16, P), lengths=LENGTHS)
    for layer in d.layers:
        assert layer.alpha == pytest.approx(GLOBAL[P], abs=1e-6), layer.layer
        assert layer.prefix_visible == [1.0] * 4


@pytest.mark.parametrize("P", [2, 3])
def test_gemma3_prefix_mass_is_summed_over_the_slots_on_both_layer_types(P):
    loaded = _uniform(tiny_gemma3(seed=0))
    d = dilution_loaded(loaded, _prefix(4, 1, 32, P), lengths=LENGTHS)
    for layer in d.layers:
        want = SLIDING[P] if layer.layer % 2 == 0 else GLOBAL[P]
        assert layer.alpha == pytest.approx(want, abs=1e-6), layer.layer
        assert layer.prefix_visible == [1.0 if a > 0 else 0.0 for a in want], layer.layer
