"""Tests written against mutants of probes/hierarchy.py (docs/tests.md): what `classify` returns in
each branch, word for word, and the hierarchy check's JSON at its thresholds."""

import torch

from probes.hierarchy import TOL, HierarchyCheck, classify
from toy_models.model import MethodState
from tests.conftest import tiny_model


def _model():
    return tiny_model(n_layers=2, n_prompt=2)


def test_classify_each_branch_word_for_word():
    m = _model()
    W_E = m.embed.W_E.detach()
    w = {"blocks.0.attn.W_Q": torch.zeros(1), "unembed.W_U": torch.zeros(1)}
    assert classify(m, MethodState(weights=w), layer0_invariant=True) == {
        "class": "weights (layer-0 attention unchanged, e.g. LoRA on o/MLP)",
        "evidence": "2 weight tensors changed; layer-0 invariance holds"}
    for inv in (False, None):
        assert classify(m, MethodState(weights=w), layer0_invariant=inv) == {
            "class": "full fine-tuning class (changes layer-0 attention: beyond prefix-tuning)",
            "evidence": "2 weight tensors changed; layer-0 invariance broken"}
    # a batch of per-sequence prompts [B, P, d_model]: every row is a token's embedding
    assert classify(m, MethodState(prompt=W_E[torch.tensor([[1, 2, 3], [4, 5, 6]])])) == {
        "class": "prompting (hard prompt)", "evidence": "every prompt embedding is a row of W_E"}
    soft = W_E[[1, 2]].clone()
    soft[1] += 0.5
    d = torch.cdist(soft, W_E).min(1).values.min().item()
    assert d == 0.0
    soft[0] += 0.25
    d = float(torch.cdist(soft, W_E).min(1).values.min())
    assert classify(m, MethodState(prompt=soft)) == {
        "class": "soft prompting", "evidence": f"prompt embeddings {d:.3g}.. away from any token"}
    k = torch.zeros(2, 1, 4)
    assert classify(m, MethodState(prefix_k=[k, None], prefix_v=[k, None])) == {
        "class": "prefix-tuning", "evidence": "prefix keys/values in 1 of 2 layers"}
    assert classify(m, MethodState(prefix_k=[k, k], prefix_v=[k, k]))["evidence"] == "prefix keys/values in 2 of 2 layers"
    assert classify(m, MethodState()) == {"class": "none", "evidence": "empty method state"}


def test_hierarchy_json_at_its_thresholds():
    assert HierarchyCheck(0.0, TOL).to_json() == {"hard_equals_soft_max_diff": 0.0, "soft_equals_prefix_max_diff": TOL,
                                                  "hard_equals_soft": True, "soft_equals_prefix": True}
    j = HierarchyCheck(1.0, TOL * 1.0001).to_json()
    assert j == {"hard_equals_soft_max_diff": 1.0, "soft_equals_prefix_max_diff": TOL * 1.0001,
                 "hard_equals_soft": False, "soft_equals_prefix": False}
    assert HierarchyCheck(1e-9, 0.0).to_json()["hard_equals_soft"] is False
