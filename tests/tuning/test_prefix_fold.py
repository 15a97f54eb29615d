"""[L]'s parameterizations fold to the common per-layer key/value layout (docs/architecture.md) and
give the same forward before and after folding, from the slot start and away from it, for
random models, prefixes and inputs."""

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from tests.conftest import micro_model
from toy_models.tasks import TaskSpec, resolve_task, sample_batch
from tuning import Prefix

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)
SHARED = [{"share": "simple"}, {"share": "deep", "mlp": "per_layer", "hidden": 6},
          {"share": "deep", "mlp": "shared", "hidden": 10}]


@settings(max_examples=12, deadline=None)
@given(variant=st.sampled_from(SHARED), init=st.sampled_from(["normal", "slot"]),
       seed=st.integers(0, 2**16), P=st.integers(1, 3), kick=st.floats(0.1, 2.0))
def test_shared_prefixes_fold_to_the_same_forward(variant, init, seed, P, kick):
    torch.manual_seed(seed)
    model = micro_model(SPEC, seed=seed % 7, n_layers=2, slots="token")
    prefix = Prefix(model, length=P, init=init, generator=torch.Generator().manual_seed(seed), **variant)
    with torch.no_grad():  # away from the start: a trained prefix, not the slot identity
        for p in prefix.parameters():
            p.add_(kick * torch.randn_like(p))
    toks = sample_batch(resolve_task("add1", SPEC), SPEC, 5, np.random.default_rng(seed)).content
    folded = prefix.fold()
    assert folded.opts["share"] == "none"
    before, after = model(toks, prefix.state()), model(toks, folded.state())
    assert torch.allclose(before, after, atol=1e-5)
    # the folded keys/values are the explicit layout, [n_heads, P, d_head] per layer
    layout = folded.export_layout()
    assert layout == {} or all(t.shape == (model.cfg.n_heads, P, model.cfg.d_head) for t in layout.values())
    for k, t in prefix.export_layout().items():
        assert torch.equal(t, layout[k])
    # and the prefix matters: another prefix gives another forward
    other = Prefix(model, length=P, share="none", generator=torch.Generator().manual_seed(seed + 1))
    assert not torch.allclose(before, model(toks, other.state()), atol=1e-4)
