"""A PEFT adapter whose recorded base model is not `--model` gets one warning line on stderr; the check goes on."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from model_checks.soft_prompt import adapter_base_warning

SMOL = "HuggingFaceTB/SmolLM2-135M"


def _prefix_adapter(path: Path, base: str | None, P: int = 2, L: int = 2, kv: int = 4, d: int = 16) -> Path:
    """A PEFT PREFIX_TUNING adapter laid out by hand, shaped for the `tiny` model (2 layers, 4 kv heads, d_head 16)."""
    path.mkdir(parents=True)
    cfg = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": P, "num_layers": L, "num_attention_heads": kv,
           "token_dim": kv * d, "base_model_name_or_path": base}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    emb = torch.randn(P, L * 2 * kv * d, generator=torch.Generator().manual_seed(0))
    save_file({"base_model.prompt_encoder.default.embedding.prompt_embeddings": emb}, str(path / "adapter_model.safetensors"))
    return path


def _cli(*args):
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _stderr(result) -> str:
    try:
        return result.stderr
    except ValueError:  # older click mixes the streams
        return result.output


def test_warning_names_both_models(tmp_path):
    a = _prefix_adapter(tmp_path / "a", SMOL)
    assert adapter_base_warning(a, "tiny") == f"warning: adapter {a} was made for {SMOL}; checking it on tiny"
    assert adapter_base_warning(_prefix_adapter(tmp_path / "own", "tiny"), "tiny") is None
    for unknown in (None, ""):  # nothing recorded: nothing to compare
        assert adapter_base_warning(_prefix_adapter(tmp_path / f"u{unknown!r}", unknown), "tiny") is None


def test_local_and_hub_cache_directories_match_their_names(tmp_path):
    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "llama"}))
    a = _prefix_adapter(tmp_path / "a", SMOL)
    assert adapter_base_warning(a, str(snap)) is None  # the snapshot of the recorded Hub id
    own_dir = tmp_path / "ckpt"
    own_dir.mkdir()
    (own_dir / "config.json").write_text(json.dumps({"model_type": "llama", "_name_or_path": SMOL}))
    assert adapter_base_warning(a, str(own_dir)) is None  # its config records the same name
    b = _prefix_adapter(tmp_path / "b", str(own_dir))
    assert adapter_base_warning(b, str(own_dir)) is None  # recorded as the local path
    other = tmp_path / "hub" / "models--Qwen--Qwen2-0.5B" / "snapshots" / "def456"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert adapter_base_warning(a, str(other)) == f"warning: adapter {a} was made for {SMOL}; checking it on {other}"
    assert adapter_base_warning(_prefix_adapter(tmp_path / "c", "HuggingFaceTB/SmolLM2-135M-Instruct"), "smollm2") is None
    assert adapter_base_warning(a, "smollm2") is not None  # the base model is not the instruct one


def test_cli_warns_once_and_still_checks(tmp_path):
    a = _prefix_adapter(tmp_path / "a", SMOL)
    r = _cli("identity-check", "--model", "tiny", "--adapter", a, "--json")
    err = _stderr(r)
    assert r.exit_code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: adapter {a} was made for {SMOL}; checking it on tiny"]
    assert json.loads(r.stdout)["prefix_len"] == 2
    r = _cli("dilution", "--model", "tiny", "--adapter", a, "--lengths", "8,16", "--json")
    assert r.exit_code == 0, _stderr(r)
    assert [line for line in _stderr(r).splitlines() if line.startswith("warning:")] == warnings
    own = _prefix_adapter(tmp_path / "own", "tiny")
    r = _cli("identity-check", "--model", "tiny", "--adapter", own, "--json")
    assert r.exit_code == 0 and "warning" not in _stderr(r)


def test_no_warning_when_the_check_fails(tmp_path):
    # an adapter of the wrong shape ends in its one error line only, not a warning too
    a = _prefix_adapter(tmp_path / "a", SMOL, L=3)
    r = _cli("identity-check", "--model", "tiny", "--adapter", a)
    err = _stderr(r)
    assert r.exit_code == 2 and "does not match" in err and "warning" not in err
