"""The [L] language analogue (study.experiments.data_to_text): the grammar, the three prefix
parameterizations on a LLaMA cache, a micro run's structure, the table row's rule, bad inputs."""

import json

import pytest
import torch

from study.experiments import data_to_text as d2t
from study.experiments.d2t_data import make_splits
from model_checks.prefix import CachePrefix, hard_prompt_prefix, load_prefix, prefix_cache, save_prefix
from prefixlab_common.errors import UserError


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py, with `tiny` and `tiny_gqa`


def test_grammar_is_deterministic_and_splits_are_disjoint_and_nested():
    a, b = make_splits(7, 40, 10, 10), make_splits(7, 40, 10, 10)
    assert a == b
    assert make_splits(8, 40, 10, 10)["test"] != a["test"]
    mrs = {s: {e.mr for e in a[s]} for s in a}
    assert all(len(mrs[s]) == len(a[s]) for s in a)  # distinct within a split
    assert not (mrs["train"] & mrs["val"] or mrs["train"] & mrs["test"] or mrs["val"] & mrs["test"])
    small = make_splits(7, 15, 10, 10)
    assert small["train"] == a["train"][:15] and small["test"] == a["test"] and small["val"] == a["val"]


def test_grammar_has_variety_and_names_every_attribute_value():
    ex = make_splits(0, 300, 1, 1)["train"]
    assert len({e.text for e in ex}) == len(ex)
    openings = {e.text.split(" ")[0] for e in ex}
    assert "There" in openings and "The" in openings
    for e in ex:
        name = e.mr.split("]")[0].removeprefix("name[")
        assert name in e.text
        if "near[" in e.mr:
            assert e.mr.split("near[")[1].split("]")[0] in e.text


def logits_with(model, prefix: CachePrefix, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, past_key_values=prefix_cache(prefix, model.config, batch=ids.shape[0]), use_cache=True).logits


@pytest.mark.parametrize("which", ["tiny", "tiny_gqa"])
def test_deep_share_folds_to_the_layer_layout_with_the_same_forward(which, request, tmp_path):
    loaded = request.getfixturevalue(which)
    model, cfg = loaded.model, loaded.model.config
    start = hard_prompt_prefix(model, torch.tensor([1, 40, 41]))
    params = d2t.PrefixParams(model, "deep", start, seed=0)
    with torch.no_grad():  # move the MLP off its zero start so that folding has something to fold
        params.mlp[2].weight.normal_(0.0, 0.05)
    folded = params.fold()
    folded.check_matches(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)
    assert folded.prefix_len == 3
    ids = torch.tensor([[1, 50, 60, 70, 80], [1, 51, 61, 71, 81]])
    live = logits_with(model, params.prefix(), ids)
    assert not torch.allclose(live, logits_with(model, start, ids), atol=1e-4)  # the MLP changed the prefix
    assert torch.allclose(live, logits_with(model, folded, ids), atol=1e-6, rtol=0)
    path = save_prefix(folded, tmp_path / "deep.safetensors", model=loaded.name)
    assert torch.allclose(live, logits_with(model, load_prefix(path), ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("which", ["tiny", "tiny_gqa"])
def test_every_share_starts_at_the_models_own_cache_of_the_start_tokens(which, request):
    loaded = request.getfixturevalue(which)
    model = loaded.model
    ids0 = d2t.start_ids(loaded.tokenizer, loaded.bos_token_id, 4)
    start = hard_prompt_prefix(model, torch.tensor(ids0))
    resid = d2t.start_residuals(model, ids0)
    for share in d2t.SHARES:
        got = d2t.PrefixParams(model, share, start, resid, seed=3).fold()
        for l in range(start.n_layers):
            # Simple-share rebuilds the keys through the norm, k_proj and RoPE at slot positions 0..P-1
            assert torch.allclose(got.keys[l], start.keys[l], atol=1e-5), (share, l)
            assert torch.allclose(got.values[l], start.values[l], atol=1e-5), (share, l)


def test_simple_share_without_rope_at_slot_positions_would_differ(tiny):
    ids0 = d2t.start_ids(tiny.tokenizer, tiny.bos_token_id, 4)
    start = hard_prompt_prefix(tiny.model, torch.tensor(ids0))
    resid = d2t.start_residuals(tiny.model, ids0)
    attn = tiny.model.model.layers[0].self_attn
    raw = attn.k_proj(tiny.model.model.layers[0].input_layernorm(resid[0])).view(4, -1, attn.head_dim).transpose(0, 1)
    assert not torch.allclose(raw, start.keys[0], atol=1e-3)  # so the RoPE step in residual_to_kv is needed


def test_micro_run_structure():
    seen = []
    res = d2t.run_scale("micro", progress=lambda i, n, info: seen.append((i, n, info)))
    cfg = d2t.SCALES["micro"]
    n_jobs = sum(len(cfg["lrs"][s]) for s in cfg["shares"]) * len(cfg["sizes"]) * len(cfg["seeds"])
    assert [i for i, _, _ in seen] == list(range(1, n_jobs + 1)) and len(res["runs"]) == n_jobs
    assert set(res["results"]) == set(cfg["shares"])
    for share, per_n in res["results"].items():
        assert set(per_n) == {str(n) for n in cfg["sizes"]}
        for r in per_n.values():
            assert r["lr"] in cfg["lrs"][share]
            assert r["val_loss"] == min(r["val_loss_by_lr"].values())  # the lr is chosen on validation
            assert len(r["test_losses"]) == len(cfg["seeds"]) and r["test_loss_std"] is not None
            assert len(r["generations"]) == cfg["n_generate"]
            assert all(isinstance(g["output"], str) and g["input"] and g["reference"] for g in r["generations"])
    assert res["results"]["deep"]["4"]["n_params"] != res["results"]["none"]["4"]["n_params"]
    row = res["table_row"]
    assert set(row) == {"claim", "paper", "lab", "holds", "criterion", "gap"} and row["holds"] in (True, False)
    json.dumps(res)


def fake(none_small, deep_small, none_large, deep_large, std):
    cell = lambda m: {"test_loss_mean": m, "test_loss_std": std}
    return {"model": "x", "config": {"seeds": [0, 1]},
            "results": {"none": {"16": cell(none_small), "256": cell(none_large)},
                        "deep": {"16": cell(deep_small), "256": cell(deep_large)}}}


def test_table_row_is_computed_from_the_numbers():
    assert d2t.table_row(fake(2.0, 1.5, 1.2, 1.15, 0.05))["holds"] is True
    assert d2t.table_row(fake(2.0, 1.5, 1.2, 0.6, 0.05))["holds"] is False  # the gap grows with n
    assert d2t.table_row(fake(2.0, 1.95, 1.2, 1.2, 0.05))["holds"] is False  # within the seed spread
    assert d2t.table_row(fake(1.5, 2.0, 1.2, 1.2, 0.05))["holds"] is False  # No-share ahead
    assert d2t.table_row(fake(2.0, 1.5, 1.2, 1.15, None))["holds"] is None  # one seed: no verdict
    only = fake(2.0, 1.5, 1.2, 1.15, 0.05)
    del only["results"]["deep"]
    assert d2t.table_row(only)["holds"] is None


@pytest.mark.parametrize("kwargs, words", [
    ({"shares": ("none", "wide")}, "unknown prefix share"),
    ({"shares": ()}, "at least one"),
    ({"sizes": (16, 0)}, "positive integers"),
    ({"sizes": ()}, "positive integers"),
    ({"prefix_len": 0}, "prefix length"),
    ({"steps": -1}, "steps"),
    ({"lrs": {"deep": (-1e-3,)}}, "learning rates"),
    ({"lrs": {"wide": 1e-3}}, "unknown share"),
    ({"device": "tpu"}, "unknown device"),
    ({"model": "/nonexistent/model-dir"}, "checkpoint directory"),
])
def test_bad_inputs_are_one_line_user_errors(kwargs, words):
    args = {**d2t.SCALES["micro"], **kwargs}
    with pytest.raises(UserError) as err:
        d2t.run_data_to_text(**args)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_unknown_scale_is_a_user_error():
    with pytest.raises(UserError, match="unknown scale"):
        d2t.run_scale("huge")


def test_cost_estimate_counts_every_run():
    est = d2t.estimate_seconds("micro", 1.0)
    assert est["runs"] == 16 and est["train_steps"] == 16 * d2t.SCALES["micro"]["steps"]
    assert est["seconds"] > est["train_steps"]


def test_lr_option_parsing():
    assert d2t.parse_lrs(["none=1e-2,3e-2", "deep=3e-4"]) == {"none": (1e-2, 3e-2), "deep": (3e-4,)}
    for bad in (["wide=1e-3"], ["deep"], ["deep=fast"]):
        with pytest.raises(UserError):
            d2t.parse_lrs(bad)
