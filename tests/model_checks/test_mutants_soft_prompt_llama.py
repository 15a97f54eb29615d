"""Tests added from the mutation run of model_checks/soft_prompt.py: exact values, metadata and
refusal messages of soft prompts (random, saved, PEFT) and of the soft prompt -> prefix cache."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from model_checks.soft_prompt import (
    FORMAT, SoftPrompt, embedding_matrix, load_peft_prompt, load_soft_prompt, random_soft_prompt,
    read_adapter_config, save_soft_prompt, soft_prompt_prefix,
)
from prefixlab_common.errors import UserError


def _raises(msg: str):
    return pytest.raises(UserError, match="^" + re.escape(msg) + "$")


# ---------------------------------------------------------------- SoftPrompt


def test_prompt_len_and_to_copy_meta():
    e = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    p = SoftPrompt(e, {"source": "x", "seed": 1})
    assert p.prompt_len == 3
    q = p.to(torch.float64)
    assert q.embeddings.dtype == torch.float64 and torch.equal(q.embeddings, e.double())
    assert q.meta == {"source": "x", "seed": 1} and q.meta is not p.meta
    q.meta["source"] = "y"
    assert p.meta["source"] == "x"
    assert SoftPrompt(e).meta == {}


def test_check_matches_shapes_and_messages():
    SoftPrompt(torch.zeros(1, 4)).check_matches(4)  # P = 1 is fine
    SoftPrompt(torch.zeros(3, 4)).check_matches(4, "x")
    with _raises("the soft prompt is (3, 5) but the model needs [P, d_model=4]; use a soft prompt made for this model"):
        SoftPrompt(torch.zeros(3, 5)).check_matches(4)
    with _raises("the thing is (0, 4) but the model needs [P, d_model=4]; use a thing made for this model"):
        SoftPrompt(torch.zeros(0, 4)).check_matches(4, "thing")
    with _raises("the soft prompt is (4,) but the model needs [P, d_model=4]; use a soft prompt made for this model"):
        SoftPrompt(torch.zeros(4)).check_matches(4)
    with _raises("the soft prompt is (1, 2, 4) but the model needs [P, d_model=4]; use a soft prompt made for this model"):
        SoftPrompt(torch.zeros(1, 2, 4)).check_matches(4)
    for bad in (float("nan"), float("inf"), float("-inf")):
        e = torch.zeros(2, 4)
        e[1, 3] = bad
        with _raises("the soft prompt holds NaN or inf values; it is corrupt"):
            SoftPrompt(e).check_matches(4)
        with _raises("the thing holds NaN or inf values; it is corrupt"):
            SoftPrompt(e).check_matches(4, "thing")


# ---------------------------------------------------------------- embedding matrix, random prompt


class _Emb:
    def __init__(self, weight):
        self.weight = weight


class _Bridged:
    def __init__(self, weight):
        self.original_component = _Emb(weight)


class _Model:
    def __init__(self, emb, model_type="llama"):
        self.emb = emb
        self.config = SimpleNamespace(model_type=model_type, hidden_size=embedding_matrix(self).shape[1])  # family.embed_scale reads it

    def get_input_embeddings(self):
        return self.emb


def test_embedding_matrix_plain_and_bridged(tiny):
    W = tiny.model.get_input_embeddings().weight
    assert embedding_matrix(tiny.model) is W
    w = torch.ones(3, 2)
    assert embedding_matrix(_Model(_Emb(w))) is w
    assert embedding_matrix(_Model(_Bridged(w))) is w


def _expected_random(W: torch.Tensor, P: int, seed: int) -> torch.Tensor:
    rms = (W.double() ** 2).mean(dim=0).sqrt()
    z = torch.randn((P, W.shape[1]), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z * rms).to(W.dtype)


def test_random_soft_prompt_values(tiny):
    W = tiny.model.get_input_embeddings().weight.detach()
    p = random_soft_prompt(tiny.model, 3, seed=4)
    assert p.embeddings.shape == (3, 64) and p.embeddings.dtype == torch.float32
    assert torch.equal(p.embeddings, _expected_random(W, 3, 4))
    assert p.meta == {"source": "random", "seed": 4}
    assert not p.embeddings.requires_grad
    d = random_soft_prompt(tiny.model, 1)
    assert d.meta == {"source": "random", "seed": 0} and d.prompt_len == 1
    assert torch.equal(d.embeddings, _expected_random(W, 1, 0))
    assert not torch.equal(random_soft_prompt(tiny.model, 3, seed=5).embeddings, p.embeddings)


def test_random_soft_prompt_scales_per_dimension():
    # hand-computed column RMS of [[3, 1, 0], [4, 1, 0]]: [sqrt((9 + 16) / 2), 1, 0]
    W = torch.tensor([[3.0, 1.0, 0.0], [4.0, 1.0, 0.0]], dtype=torch.float64)
    p = random_soft_prompt(_Model(_Emb(W)), 2, seed=1)
    z = torch.randn((2, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rms = torch.tensor([(12.5) ** 0.5, 1.0, 0.0], dtype=torch.float64)
    assert p.embeddings.dtype == torch.float64
    assert torch.allclose(p.embeddings, z * rms, rtol=0, atol=1e-15)
    assert torch.all(p.embeddings[:, 2] == 0)
    h = random_soft_prompt(_Model(_Emb(W.half())), 2, seed=1)
    assert h.embeddings.dtype == torch.float16
    # Gemma feeds its rows times sqrt(d_model) = sqrt(3): the soft prompt lives on that scale
    g = random_soft_prompt(_Model(_Emb(W), "gemma3_text"), 2, seed=1)
    assert torch.allclose(g.embeddings, z * rms * 3 ** 0.5, rtol=0, atol=1e-14)


def test_random_soft_prompt_refuses_bad_length(tiny):
    with _raises("the soft prompt length must be >= 1, got 0"):
        random_soft_prompt(tiny.model, 0)
    with _raises("the soft prompt length must be >= 1, got -2"):
        random_soft_prompt(tiny.model, -2, seed=3)


# ---------------------------------------------------------------- soft prompt -> prefix


def test_soft_prompt_prefix_is_the_prompt_forward_cache(tiny):
    from transformers import DynamicCache

    model = tiny.model
    prompt = SoftPrompt(torch.randn(3, 64, generator=torch.Generator().manual_seed(11), dtype=torch.float64),
                        {"source": "random", "seed": 9})
    pre = soft_prompt_prefix(model, prompt)
    assert pre.n_layers == 2 and len(pre.values) == 2 and pre.prefix_len == 3
    assert pre.meta == {"source": "soft-prompt:random", "seed": 9}
    assert prompt.meta == {"source": "random", "seed": 9}
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(inputs_embeds=prompt.embeddings.float().unsqueeze(0), past_key_values=cache, use_cache=True)
    for l in range(2):
        k, v = pre.keys[l], pre.values[l]
        assert k.shape == (4, 3, 16) and v.shape == (4, 3, 16)
        assert k.dtype == torch.float32 and v.dtype == torch.float32
        assert not k.requires_grad and not v.requires_grad
        assert torch.equal(k, cache.layers[l].keys[0]) and torch.equal(v, cache.layers[l].values[0])
    assert not torch.equal(pre.keys[0], pre.keys[1])
    assert not torch.equal(pre.keys[0], pre.values[0])
    # a fresh forward gives the same cache: keys are at positions 0..P-1 only, not reused state
    again = soft_prompt_prefix(model, SoftPrompt(prompt.embeddings))
    assert again.meta == {"source": "soft-prompt:?"}
    for l in range(2):
        assert torch.equal(again.keys[l], pre.keys[l]) and torch.equal(again.values[l], pre.values[l])


def test_soft_prompt_prefix_gqa_shape(tiny_gqa):
    prompt = random_soft_prompt(tiny_gqa.model, 2, seed=1)
    pre = soft_prompt_prefix(tiny_gqa.model, prompt)
    assert [tuple(k.shape) for k in pre.keys] == [(2, 2, 16), (2, 2, 16)]
    assert [tuple(v.shape) for v in pre.values] == [(2, 2, 16), (2, 2, 16)]
    assert pre.meta == {"source": "soft-prompt:random", "seed": 1}


# ---------------------------------------------------------------- save / load


def _raw(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as h:
        return h.metadata(), {n: h.get_tensor(n) for n in h.keys()}


def test_save_soft_prompt_exact_file(tmp_path):
    e = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    prompt = SoftPrompt(e, {"source": "random", "seed": 5, "model": "meta-m"})
    out = save_soft_prompt(prompt, tmp_path / "a" / "b" / "p.safetensors", model="tiny")
    assert out == tmp_path / "a" / "b" / "p.safetensors" and isinstance(out, Path)
    meta, tensors = _raw(out)
    assert set(meta) == {"format", "version", "prefixlab"}
    assert meta["format"] == "prefixlab.soft_prompt" == FORMAT and meta["version"] == "1"
    assert json.loads(meta["prefixlab"]) == {"prompt_len": 2, "d_model": 4, "dtype": "float32", "source": "random",
                                             "model": "tiny", "seed": 5}
    assert list(tensors) == ["embeddings"] and torch.equal(tensors["embeddings"], e)


def test_save_soft_prompt_defaults_and_overrides(tmp_path):
    e = torch.ones(3, 2, dtype=torch.float64)
    out = save_soft_prompt(SoftPrompt(e), str(tmp_path / "d.safetensors"))
    assert isinstance(out, Path)
    meta, tensors = _raw(out)
    assert json.loads(meta["prefixlab"]) == {"prompt_len": 3, "d_model": 2, "dtype": "float64", "source": "unknown",
                                             "model": "", "seed": None}
    assert tensors["embeddings"].dtype == torch.float64
    p = SoftPrompt(torch.zeros(1, 2, dtype=torch.bfloat16), {"source": "peft", "model": "from-meta", "seed": 2})
    out = save_soft_prompt(p, tmp_path / "o.safetensors", source="trained")
    assert json.loads(_raw(out)[0]["prefixlab"]) == {"prompt_len": 1, "d_model": 2, "dtype": "bfloat16",
                                                     "source": "trained", "model": "from-meta", "seed": 2}
    # a non-contiguous, grad-requiring prompt is saved as its values
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).t().requires_grad_(True)
    out = save_soft_prompt(SoftPrompt(t), tmp_path / "t.safetensors")
    assert torch.equal(_raw(out)[1]["embeddings"], t.detach())


def test_save_load_round_trip_meta(tmp_path):
    e = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    path = save_soft_prompt(SoftPrompt(e, {"source": "random", "seed": 7}), tmp_path / "p.safetensors", model="tiny")
    loaded = load_soft_prompt(path)
    assert torch.equal(loaded.embeddings, e)
    assert loaded.meta == {"prompt_len": 2, "d_model": 4, "dtype": "float32", "source": "file", "model": "tiny",
                           "seed": 7, "file": str(path)}
    loaded2 = load_soft_prompt(str(path))
    assert loaded2.meta == loaded.meta


def test_load_soft_prompt_refusals_and_lenient_meta(tmp_path):
    from safetensors.torch import save_file

    missing = tmp_path / "none.safetensors"
    with _raises(f"soft-prompt file {missing} does not exist; give 'random' or a .safetensors soft-prompt file"):
        load_soft_prompt(missing)
    other = tmp_path / "other.safetensors"
    save_file({"embeddings": torch.zeros(1, 2)}, str(other), metadata={"format": "prefixlab.prefix"})
    with _raises(f"{other} is not a prefixlab soft-prompt file (metadata format='prefixlab.prefix'); save it with save_soft_prompt"):
        load_soft_prompt(other)
    noemb = tmp_path / "noemb.safetensors"
    save_file({"weights": torch.zeros(1, 2)}, str(noemb), metadata={"format": FORMAT, "version": "1"})
    with _raises(f"{noemb} has no 'embeddings' tensor; re-save it with save_soft_prompt"):
        load_soft_prompt(noemb)
    bare = tmp_path / "bare.safetensors"
    save_file({"embeddings": torch.ones(1, 2)}, str(bare), metadata={"format": FORMAT})
    assert load_soft_prompt(bare).meta == {"source": "file", "file": str(bare)}
    badjson = tmp_path / "bad.safetensors"
    save_file({"embeddings": torch.ones(1, 2)}, str(badjson), metadata={"format": FORMAT, "prefixlab": "{not json"})
    p = load_soft_prompt(badjson)
    assert p.meta == {"source": "file", "file": str(badjson)} and torch.equal(p.embeddings, torch.ones(1, 2))
    src = tmp_path / "src.safetensors"
    save_file({"embeddings": torch.ones(1, 2)}, str(src), metadata={"format": FORMAT, "prefixlab": json.dumps({"source": "random", "file": "x"})})
    assert load_soft_prompt(src).meta == {"source": "file", "file": str(src)}


# ---------------------------------------------------------------- PEFT adapter


def _adapter(d: Path, config, tensors=None, raw_config: bytes | None = None) -> Path:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    if raw_config is not None:
        (d / "adapter_config.json").write_bytes(raw_config)
    elif config is not None:
        (d / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def _emb(P=3, d=64, seed=0):
    return torch.randn(P, d, generator=torch.Generator().manual_seed(seed))


def test_read_adapter_config_refusals(tmp_path):
    nodir = tmp_path / "nodir"
    with _raises(f"adapter {nodir} is not a directory; point --adapter at a PEFT adapter directory"):
        read_adapter_config(nodir)
    f = tmp_path / "file"
    f.write_text("{}")
    with _raises(f"adapter {f} is not a directory; point --adapter at a PEFT adapter directory"):
        read_adapter_config(f)
    d = _adapter(tmp_path / "noconf", None, {"prompt_embeddings": _emb()})
    with _raises(f"{d} has no adapter_config.json; point --adapter at a PEFT adapter directory"):
        read_adapter_config(d)
    d = _adapter(tmp_path / "noweights", {"peft_type": "PROMPT_TUNING"})
    with _raises(f"{d} has no adapter_model.safetensors; the adapter is incomplete"):
        read_adapter_config(d)
    (d / "adapter_model.bin").write_bytes(b"x")
    with _raises(f"{d} holds a pickle adapter_model.bin, which prefixlab never loads; re-save it with safe_serialization=True"):
        read_adapter_config(str(d))
    d = _adapter(tmp_path / "badjson", None, {"prompt_embeddings": _emb()}, raw_config=b"{oops")
    with _raises(f"{d / 'adapter_config.json'} is not valid JSON; the adapter is corrupt"):
        read_adapter_config(d)
    d = _adapter(tmp_path / "badutf", None, {"prompt_embeddings": _emb()}, raw_config=b'{"a": "\xff\xfe"}')
    with _raises(f"{d / 'adapter_config.json'} is not valid JSON; the adapter is corrupt"):
        read_adapter_config(d)
    d = _adapter(tmp_path / "list", [1, 2], {"prompt_embeddings": _emb()})
    with _raises(f"{d / 'adapter_config.json'} is not a JSON object; the adapter is corrupt"):
        read_adapter_config(d)
    cfg = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}
    d = _adapter(tmp_path / "ok", cfg, {"prompt_embeddings": _emb()})
    assert read_adapter_config(str(d)) == cfg


def test_load_peft_prompt_exact(tmp_path):
    e = _emb(3, 64, 1)
    cfg = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 64, "num_layers": 2,
           "num_attention_heads": 4, "num_transformer_submodules": 1, "base_model_name_or_path": "base/x"}
    d = _adapter(tmp_path / "a", cfg, {"base_model.model.prompt_embeddings": e, "other": torch.zeros(2)})
    p = load_peft_prompt(d, 64, 2, 4)
    assert torch.equal(p.embeddings, e) and p.embeddings.dtype == torch.float32
    assert p.meta == {"source": "peft", "adapter": str(d), "base_model": "base/x"}
    # only the shape keys are required; missing ones are not checked
    d2 = _adapter(tmp_path / "b", {"peft_type": "PROMPT_TUNING"}, {"prompt_embeddings": _emb(2, 64)})
    p2 = load_peft_prompt(str(d2), 64, 99, 99)
    assert p2.prompt_len == 2 and p2.meta == {"source": "peft", "adapter": str(d2), "base_model": None}
    # num_transformer_submodules None or 0 counts as 1
    for subs in (None, 0):
        d3 = _adapter(tmp_path / f"s{subs}", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2,
                                             "num_transformer_submodules": subs}, {"prompt_embeddings": _emb(2, 64)})
        assert load_peft_prompt(d3, 64).prompt_len == 2


def test_load_peft_prompt_mismatch_messages(tmp_path):
    t = {"prompt_embeddings": _emb()}
    d = _adapter(tmp_path / "pre", {"peft_type": "PREFIX_TUNING"}, t)
    with _raises(f"{d} is a 'PREFIX_TUNING' adapter, not a PEFT PROMPT_TUNING (soft prompt) adapter"):
        load_peft_prompt(d, 64)
    d = _adapter(tmp_path / "none", {}, t)
    with _raises(f"{d} is a None adapter, not a PEFT PROMPT_TUNING (soft prompt) adapter"):
        load_peft_prompt(d, 64)
    base = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}
    d = _adapter(tmp_path / "all", dict(base, token_dim=32, num_layers=3, num_attention_heads=8, num_transformer_submodules=2), t)
    with _raises("the prompt-tuning adapter does not match the model (token_dim=32 vs hidden size 64; num_layers=3 vs 2; "
                 "num_attention_heads=8 vs 4; num_transformer_submodules=2 (an encoder-decoder adapter) vs 1); "
                 "use an adapter trained on this model"):
        load_peft_prompt(d, 64, 2, 4)
    d = _adapter(tmp_path / "layers", dict(base, num_layers=3, num_attention_heads=4, token_dim=64), t)
    with _raises("the prompt-tuning adapter does not match the model (num_layers=3 vs 2); use an adapter trained on this model"):
        load_peft_prompt(d, 64, 2, 4)
    assert load_peft_prompt(d, 64, None, 4).prompt_len == 3  # n_layers unknown: not checked
    d = _adapter(tmp_path / "heads", dict(base, num_layers=2, num_attention_heads=8), t)
    with _raises("the prompt-tuning adapter does not match the model (num_attention_heads=8 vs 4); use an adapter trained on this model"):
        load_peft_prompt(d, 64, 2, 4)
    assert load_peft_prompt(d, 64, 2).prompt_len == 3  # n_heads unknown: not checked
    d = _adapter(tmp_path / "dim", dict(base, token_dim=32), t)
    with _raises("the prompt-tuning adapter does not match the model (token_dim=32 vs hidden size 64); use an adapter trained on this model"):
        load_peft_prompt(d, 64)
    d = _adapter(tmp_path / "subs", dict(base, num_transformer_submodules=2), {"prompt_embeddings": _emb(6)})
    with _raises("the prompt-tuning adapter does not match the model (num_transformer_submodules=2 (an encoder-decoder adapter) vs 1); "
                 "use an adapter trained on this model"):
        load_peft_prompt(d, 64)


def test_load_peft_prompt_weight_refusals(tmp_path):
    base = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}
    d = _adapter(tmp_path / "noemb", base, {"prompt_embeddings_x": _emb(), "embeddings": _emb()})
    w = d / "adapter_model.safetensors"
    with _raises(f"{w} has no prompt_embeddings tensor; is it a prompt-tuning adapter?"):
        load_peft_prompt(d, 64)
    d = _adapter(tmp_path / "corrupt", base)
    (d / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    w = d / "adapter_model.safetensors"
    with _raises(f"{w} is not a readable safetensors file (SafetensorError); the adapter is corrupt"):
        load_peft_prompt(d, 64)
    d = _adapter(tmp_path / "len", base, {"prompt_embeddings": _emb(4)})
    with _raises("the adapter's prompt_embeddings is (4, 64), expected [3, 64] for this model; use an adapter trained on this model"):
        load_peft_prompt(d, 64)
    d = _adapter(tmp_path / "width", {"peft_type": "PROMPT_TUNING"}, {"prompt_embeddings": _emb(3, 32)})
    with _raises("the adapter's prompt_embeddings is (3, 32), expected [None, 64] for this model; use an adapter trained on this model"):
        load_peft_prompt(d, 64)
    d = _adapter(tmp_path / "ndim", base, {"prompt_embeddings": torch.zeros(3, 64, 1)})
    with _raises("the adapter's prompt_embeddings is (3, 64, 1), expected [3, 64] for this model; use an adapter trained on this model"):
        load_peft_prompt(d, 64)
    e = _emb(3)
    e[0, 0] = float("nan")
    d = _adapter(tmp_path / "nan", base, {"prompt_embeddings": e})
    with _raises("the adapter's soft prompt holds NaN or inf values; it is corrupt"):
        load_peft_prompt(d, 64)
    d = _adapter(tmp_path / "empty", {"peft_type": "PROMPT_TUNING"}, {"prompt_embeddings": torch.zeros(0, 64)})
    with _raises("the adapter's soft prompt is (0, 64) but the model needs [P, d_model=64]; use a adapter's soft prompt made for this model"):
        load_peft_prompt(d, 64)
