"""model_checks/prefix.py, the LLaMA prefix cache and its sources: tests that pin what the
mutation run of this module showed open (docs/tests.md, "Every survivor"): the cache's layer
placement and batch, the random prefix's scale and dtype, the prefix file's metadata and every
refusal message of the file and PEFT readers, and the PEFT layout against a hand-built adapter."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from model_checks.prefix import (
    FORMAT, CachePrefix, dart_lines, hard_prompt_prefix, load_peft_prefix, load_prefix, prefix_cache,
    prefix_from_source, random_normals, random_prefix_layer, read_tagged, save_prefix,
)
from prefixlab_common.errors import UserError


def prefix(L=2, kv=2, P=3, d=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return CachePrefix([torch.randn(kv, P, d, generator=g, dtype=dtype) for _ in range(L)],
                  [torch.randn(kv, P, d, generator=g, dtype=dtype) for _ in range(L)], {"source": "x", "seed": seed})


def test_prefix_properties_and_cast():
    p = prefix(L=3, P=5)
    assert (p.n_layers, p.prefix_len) == (3, 5)
    h = p.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in h.keys + h.values)
    assert all(torch.equal(a.double(), b) for a, b in zip(p.keys + p.values, h.keys + h.values))
    assert h.meta == p.meta and h.meta is not p.meta


def test_check_matches_messages():
    p = prefix(L=2, kv=2, P=3, d=4)
    p.check_matches(2, 2, 4)
    with pytest.raises(UserError, match=re.escape("the prefix file has 2 layers but the model has 3; use a prefix file made for this model")):
        p.check_matches(3, 2, 4, "prefix file")
    for kv, d in ((4, 4), (2, 8)):
        with pytest.raises(UserError, match=re.escape(f"the prefix's layer 0 is (2, 3, 4) but the model needs [kv_heads={kv}, P, d_head={d}]; use a prefix made for this model")):
            p.check_matches(2, kv, d)
    bad = prefix(L=2, kv=2, P=3, d=4)
    bad.values[1] = torch.zeros(2, 2, 4)  # values shorter than the keys
    with pytest.raises(UserError, match=re.escape("layer 1 is (2, 2, 4)")):
        bad.check_matches(2, 2, 4)
    bad = prefix(L=2)
    bad.keys[1] = torch.zeros(2, 3)
    with pytest.raises(UserError, match=re.escape("layer 1 is (2, 3)")):
        bad.check_matches(2, 2, 4)


@pytest.fixture(scope="module")
def cfg():
    from model_checks.models import tiny_llama_config
    return tiny_llama_config(gqa=True)


def test_prefix_cache_places_each_layer_and_expands_the_batch(cfg):
    p = prefix(L=2, kv=2, P=3, d=16)
    c = prefix_cache(p, cfg, batch=3)
    assert len(c.layers) == 2
    for l in range(2):
        assert c.layers[l].keys.shape == (3, 2, 3, 16)
        assert all(torch.equal(c.layers[l].keys[b], p.keys[l]) and torch.equal(c.layers[l].values[b], p.values[l]) for b in range(3))
    from model_checks.models import tiny_llama_config
    one = prefix_cache(p, tiny_llama_config(gqa=True, n_layers=1), layers=range(1, 2))  # a one-layer model's layer 0
    assert len(one.layers) == 1 and one.layers[0].keys.shape == (1, 2, 3, 16)
    assert torch.equal(one.layers[0].keys[0], p.keys[1]) and torch.equal(one.layers[0].values[0], p.values[1])


def test_prefix_cache_follows_the_models_config():
    """A sliding-window model (mistral, qwen2) gets sliding-window cache layers, as its own cache."""
    from transformers import MistralConfig
    cfg = MistralConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, sliding_window=4)
    c = prefix_cache(prefix(L=2, kv=2, P=3, d=16), cfg)
    assert [type(l).__name__ for l in c.layers] == ["DynamicSlidingWindowLayer"] * 2


def test_random_prefix_layer_scales_to_the_content_rms_per_head_and_dim():
    g = torch.Generator().manual_seed(1)
    zk, zv = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    ck = torch.randn(5, 2, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    cv = torch.randn(5, 2, 4, generator=g) * 0.5
    cv[:, 1, 2] = 0.0  # a dimension with no content: clamped at 1e-6
    k, v = random_prefix_layer(zk, zv, ck, cv)
    rms_k = ck.double().pow(2).mean(0).sqrt()
    rms_v = cv.double().pow(2).mean(0).sqrt().clamp_min(1e-6)
    torch.testing.assert_close(k, (zk.double() * rms_k[:, None, :]).float())
    torch.testing.assert_close(v, (zv.double() * rms_v[:, None, :]).float())
    assert v[1, :, 2].abs().max() <= 1e-6 * zv[1, :, 2].abs().max() * 1.0001 and v[1, :, 2].abs().max() > 0
    kb, vb = random_prefix_layer(zk, zv, ck.bfloat16(), cv.half())
    assert kb.dtype == torch.bfloat16 and vb.dtype == torch.float16


def test_random_normals_are_the_seeds_draws():
    k, v = random_normals(2, 3, 4, 5, seed=7)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(k, torch.randn((2, 3, 4, 5), generator=g)) and torch.equal(v, torch.randn((2, 3, 4, 5), generator=g))


def test_hard_prompt_prefix_records_its_ids():
    from model_checks.models import tiny_llama
    m = tiny_llama(seed=0, gqa=True)
    ids = torch.tensor([1, 40, 41])
    p = hard_prompt_prefix(m.model, ids)
    assert p.meta == {"source": "hard-prompt", "ids": [1, 40, 41]}
    assert p.n_layers == 2 and p.keys[0].shape == (2, 3, 16) and not p.keys[0].requires_grad


def test_dart_lines_are_the_shipped_non_empty_lines():
    from model_checks.prefix import DATA_DIR
    lines = dart_lines()
    raw = (DATA_DIR / "dart_style.txt").read_text().splitlines()
    assert lines == [l.strip() for l in raw if l.strip()] and lines[0].startswith("TABLE: ")


def test_save_prefix_writes_the_documented_metadata(tmp_path):
    p = prefix(L=2, kv=2, P=3, d=4)
    path = save_prefix(p, tmp_path / "deep" / "p.safetensors", model="tiny", source="train")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["layers.0.key", "layers.0.value", "layers.1.key", "layers.1.value"]
    assert meta["format"] == FORMAT == "prefixlab.prefix" and meta["version"] == "1"
    assert json.loads(meta["prefixlab"]) == {"n_layers": 2, "n_kv_heads": 2, "d_head": 4, "prefix_len": 3,
                                             "dtype": "float32", "source": "train", "model": "tiny", "seed": 0,
                                             "keys": "post-rotary cache keys"}
    q = CachePrefix(p.keys, p.values, {"source": "random", "model": "m0"})
    info = load_prefix(save_prefix(q, tmp_path / "q.safetensors")).meta
    assert info["source"] == "random" and info["model"] == "m0" and info["seed"] is None
    single = CachePrefix(p.keys[:1], p.values[:1])  # one layer: every field read from layer 0
    info = load_prefix(save_prefix(single, tmp_path / "two" / "levels" / "s.safetensors")).meta
    assert (info["n_layers"], info["n_kv_heads"], info["d_head"], info["dtype"]) == (1, 2, 4, "float32")
    r = load_prefix(save_prefix(CachePrefix(p.keys, p.values), tmp_path / "r.safetensors"))
    assert r.meta["source"] == "unknown" and r.meta["model"] == "" and r.meta["file"] == str(tmp_path / "r.safetensors")


def corrupt_error(path):
    """The class name of what safetensors raises on a corrupt file (named in the message)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as err:
        name = type(err).__name__
    assert name != "NoneType"
    return name


def test_load_prefix_names_the_prefix_file_and_its_saver(tmp_path):
    give = "'random', 'train' or a .safetensors prefix file"
    with pytest.raises(UserError, match=re.escape(f"prefix file {tmp_path / 'no'} does not exist; give {give}")):
        load_prefix(tmp_path / "no")
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(1)}, str(other), metadata={"format": "pt"})
    with pytest.raises(UserError, match=re.escape(f"{other} is not a prefixlab prefix file (metadata format='pt'); save it with save_prefix")):
        load_prefix(other)
    bad = tmp_path / "bad"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match=re.escape(f"({corrupt_error(bad)}); the prefix file is corrupt")):
        load_prefix(bad)


def test_read_tagged_and_load_prefix_messages(tmp_path):
    args = ("prefix", "'random' or a file", "save_prefix")
    with pytest.raises(UserError, match=re.escape(f"prefix file {tmp_path / 'no'} does not exist; give 'random' or a file")):
        read_tagged(tmp_path / "no", FORMAT, *args)
    bad = tmp_path / "bad"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match=re.escape(f"{bad} is not a readable safetensors file ({corrupt_error(bad)}); the prefix file is corrupt")):
        read_tagged(bad, FORMAT, *args)
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(1)}, str(other), metadata={"format": "pt"})
    with pytest.raises(UserError, match=re.escape(f"{other} is not a prefixlab prefix file (metadata format='pt'); save it with save_prefix")):
        read_tagged(other, FORMAT, *args)
    none = tmp_path / "none.safetensors"
    save_file({"a": torch.zeros(1)}, str(none))
    with pytest.raises(UserError, match=re.escape("(metadata format=None)")):
        read_tagged(none, FORMAT, *args)
    ok = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(2)}, str(ok), metadata={"format": FORMAT, "x": "1"})
    meta, tensors = read_tagged(ok, FORMAT, *args)
    assert meta == {"format": FORMAT, "x": "1"} and torch.equal(tensors["a"], torch.ones(2))
    with pytest.raises(UserError, match=re.escape(f"{ok} is an incomplete prefix file (missing 'prefixlab'); re-save it with save_prefix")):
        load_prefix(ok)
    part = tmp_path / "part.safetensors"
    save_file({"layers.0.key": torch.zeros(1, 1, 1), "layers.0.value": torch.zeros(1, 1, 1)}, str(part),
              metadata={"format": FORMAT, "prefixlab": json.dumps({"n_layers": 2})})
    with pytest.raises(UserError, match=re.escape("missing 'layers.1.key'")):
        load_prefix(part)
    save_file({}, str(part), metadata={"format": FORMAT, "prefixlab": "{not json"})
    with pytest.raises(UserError, match="incomplete prefix file"):
        load_prefix(part)


def peft_adapter(path, P=3, L=2, kv=2, d=4, **overrides):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": P, "num_layers": L, "num_attention_heads": kv,
           "token_dim": kv * d, "base_model_name_or_path": "tiny", **overrides}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    emb = torch.arange(P * L * 2 * kv * d, dtype=torch.float32).reshape(P, L * 2 * kv * d)
    save_file({"base_model.prompt_encoder.default.embedding.prompt_embeddings": emb}, str(path / "adapter_model.safetensors"))
    return emb


def test_peft_layout_by_hand(tmp_path):
    emb = peft_adapter(tmp_path / "a")
    p = load_peft_prefix(tmp_path / "a", 2, 2, 4)
    assert p.meta == {"source": "peft", "adapter": str(tmp_path / "a"), "base_model": "tiny"}
    # element [t, ((2l + s) * kv + h) * d + e] is layer l's (s=0 key, s=1 value) head h, slot t, dim e
    for l in range(2):
        for s, t in enumerate((p.keys[l], p.values[l])):
            assert t.shape == (2, 3, 4) and t.is_contiguous()
            for h in range(2):
                for slot in range(3):
                    want = emb[slot, ((2 * l + s) * 2 + h) * 4:((2 * l + s) * 2 + h) * 4 + 4]
                    assert torch.equal(t[h, slot], want)


def test_peft_refusals_and_their_messages(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    with pytest.raises(UserError, match=re.escape(f"{a} has no adapter_config.json; point --adapter at a PEFT adapter directory")):
        load_peft_prefix(a, 2, 2, 4)
    (a / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match=re.escape(f"{a} has no adapter_model.safetensors; the adapter is incomplete")):
        load_peft_prefix(a, 2, 2, 4)
    (a / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(UserError, match=re.escape(f"{a} holds a pickle adapter_model.bin, which prefixlab never loads; re-save it with safe_serialization=True")):
        load_peft_prefix(a, 2, 2, 4)
    peft_adapter(a)
    (a / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match=re.escape(f"{a / 'adapter_config.json'} is not valid JSON; the adapter is corrupt")):
        load_peft_prefix(a, 2, 2, 4)
    peft_adapter(a, peft_type="LORA")
    with pytest.raises(UserError, match=re.escape(f"{a} is a 'LORA' adapter; only PEFT PREFIX_TUNING adapters hold a prefix")):
        load_peft_prefix(a, 2, 2, 4)
    peft_adapter(a)
    msg = ("the adapter (num_layers=2, num_attention_heads=2, token_dim=8) does not match the model (layers={}, "
           "kv_heads={}, kv_heads*d_head={}); use an adapter trained on this model")
    for L, kv, d in ((3, 2, 4), (2, 4, 2), (2, 2, 8)):
        with pytest.raises(UserError, match=re.escape(msg.format(L, kv, kv * d))):
            load_peft_prefix(a, L, kv, d)
    save_file({"other": torch.zeros(1)}, str(a / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=re.escape(f"{a / 'adapter_model.safetensors'} has no prompt_embeddings tensor; is it a prefix-tuning adapter?")):
        load_peft_prefix(a, 2, 2, 4)
    (a / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match=re.escape(f"{a / 'adapter_model.safetensors'} is not a readable safetensors file "
                                                  f"({corrupt_error(a / 'adapter_model.safetensors')}); the adapter is corrupt")):
        load_peft_prefix(a, 2, 2, 4)
    save_file({"x.prompt_embeddings": torch.zeros(3, 31)}, str(a / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=re.escape("the adapter's prompt_embeddings is (3, 31), expected [3, 32] for this model; use an adapter trained on this model")):
        load_peft_prefix(a, 2, 2, 4)
    save_file({"x.prompt_embeddings": torch.zeros(3, 32, 1)}, str(a / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=re.escape("is (3, 32, 1), expected [3, 32]")):
        load_peft_prefix(a, 2, 2, 4)


def test_prefix_from_source_each_source(tmp_path):
    peft_adapter(tmp_path / "a")
    got = prefix_from_source("random", str(tmp_path / "a"), 2, 2, 4, 9, 0, None)  # the adapter wins
    assert got.meta["source"] == "peft" and got.prefix_len == 3
    content = {l: (torch.full((6, 2, 4), 2.0 * (l + 1)), torch.full((6, 2, 4), 0.5)) for l in range(3)}
    for src in ("random", "train"):
        r = prefix_from_source(src, None, 3, 2, 4, 5, 11, lambda l: content[l])
        zk, zv = random_normals(3, 2, 5, 4, 11)
        assert r.meta == {"source": "random", "seed": 11} and r.n_layers == 3 and r.prefix_len == 5
        for l in range(3):
            torch.testing.assert_close(r.keys[l], zk[l] * 2.0 * (l + 1))
            torch.testing.assert_close(r.values[l], zv[l] * 0.5)
    path = save_prefix(prefix(L=2, kv=2, P=3, d=4), tmp_path / "p.safetensors")
    assert prefix_from_source(str(path), None, 2, 2, 4, 99, 0, None).prefix_len == 3
    with pytest.raises(UserError, match=re.escape("the prefix file has 2 layers but the model has 3")):
        prefix_from_source(str(path), None, 3, 2, 4, 3, 0, None)


def hand_loss(model, tok, init, bos, order):
    """Mean next-token cross-entropy of the chosen lines behind `init`'s cache, one line at a time
    (no padding: right padding cannot change a real token's logits)."""
    import torch.nn.functional as F
    seqs = [([bos] if bos is not None else []) + tok(line, add_special_tokens=False).input_ids for line in dart_lines()]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in order:
            s = seqs[i]
            logits = model(input_ids=torch.tensor([s]), past_key_values=prefix_cache(init, model.config)).logits[0]
            total += F.cross_entropy(logits[:-1].float(), torch.tensor(s[1:]), reduction="sum").item()
            count += len(s) - 1
    return total / count


@pytest.mark.parametrize("bos", [1, None])
def test_train_prefix_first_loss_by_hand_progress_and_record(bos):
    import inspect

    from model_checks.models import tiny_llama
    from model_checks.prefix import train_prefix
    loaded = tiny_llama(seed=0, gqa=True)
    model, tok = loaded.model, loaded.tokenizer
    init = hard_prompt_prefix(model, torch.tensor([1, 1]))
    msgs = []
    pre, losses = train_prefix(model, tok, init, bos, steps=2, batch_size=3, lr=0.01, seed=5, progress=msgs.append)
    order = torch.randperm(len(dart_lines()), generator=torch.Generator().manual_seed(5))[:3].tolist()
    assert losses[0] == pytest.approx(hand_loss(model, tok, init, bos, order), rel=1e-4)
    assert msgs == [f"train prefix step {i + 1}/2: loss {losses[i]:.3f}" for i in range(2)]
    assert pre.meta == {**init.meta, "source": "train", "steps": 2, "lr": 0.01, "batch_size": 3,
                        "data": "model_checks/data/dart_style.txt"}
    # both keys and values moved; the model stays frozen
    assert all(not torch.equal(a, b.float()) for a, b in zip(pre.keys + pre.values, init.keys + init.values))
    assert not any(p.requires_grad for p in model.parameters())
    assert all(not t.requires_grad for t in pre.keys + pre.values)
    defaults = {k: v.default for k, v in inspect.signature(train_prefix).parameters.items()
                if v.default is not inspect.Parameter.empty}
    assert defaults == {"steps": 30, "batch_size": 4, "lr": 0.05, "seed": 0, "progress": None}


def test_train_prefix_defaults_in_use():
    """The defaults as a call sees them (a mutated default is invisible to inspect.signature
    behind mutmut's trampoline): 30 steps of 4 lines at lr 0.05, lines drawn with seed 0."""
    from model_checks.models import tiny_llama
    from model_checks.prefix import train_prefix
    loaded = tiny_llama(seed=0, gqa=True)
    model, tok = loaded.model, loaded.tokenizer
    init = hard_prompt_prefix(model, torch.tensor([1]))
    pre, losses = train_prefix(model, tok, init, 1)
    assert len(losses) == 30 and (pre.meta["steps"], pre.meta["batch_size"], pre.meta["lr"]) == (30, 4, 0.05)
    order = torch.randperm(len(dart_lines()), generator=torch.Generator().manual_seed(0))[:4].tolist()
    assert losses[0] == pytest.approx(hand_loss(model, tok, init, 1, order), rel=1e-4)


def test_train_prefix_on_a_bf16_model_casts_the_trained_float_prefix():
    from model_checks.models import tiny_llama
    from model_checks.prefix import train_prefix
    loaded = tiny_llama(seed=0, gqa=True, dtype=torch.bfloat16)
    init = hard_prompt_prefix(loaded.model, torch.tensor([1]))
    pre, losses = train_prefix(loaded.model, loaded.tokenizer, init, 1, steps=1, batch_size=2)
    assert len(losses) == 1 and math.isfinite(losses[0]) and pre.keys[0].dtype == torch.float32
