"""Prefixes for LLaMA-family models: the per-layer key/value cache a prefix puts before the content.

One format for every source (docs/architecture.md, "A method is data"): per layer, keys and values
``[kv_heads, P, d_head]``. The keys are the *cached* keys, i.e. after the rotary map, exactly what
`transformers.DynamicCache` holds and what PEFT prefix-tuning injects; RoPE is never applied to
them again.

Sources: ``random`` (seeded, scaled per layer, key/value head and dimension to the RMS of the
model's own content keys/values), ``train`` (initialized to the cache of P BOS tokens, then trained
for a few dozen Adam steps on the shipped DART-style lines in ``model_checks/data/dart_style.txt``), a prefixlab prefix file, and a PEFT
prefix-tuning adapter directory.

Prefix file format (``prefixlab.prefix``, version 1): one safetensors file with tensors
``layers.{l}.key`` and ``layers.{l}.value`` of shape ``[kv_heads, P, d_head]`` for l = 0..L-1, and
safetensors metadata ``{"format": "prefixlab.prefix", "version": "1", "prefixlab": <JSON>}``
where the JSON holds ``n_layers, n_kv_heads, d_head, prefix_len, dtype, source, model, seed`` and
``"keys": "post-rotary cache keys"``. Save with `save_prefix`, read with `load_prefix`.

PEFT layout (peft 0.21 `PeftModel.get_prompt`, prefix-tuning without or with folded projection):
``adapter_model.safetensors`` holds ``prompt_embeddings`` of shape ``[P, L*2*kv_heads*d_head]``;
it is viewed as ``[P, L*2, kv_heads, d_head]`` and permuted to ``[L*2, kv_heads, P, d_head]``;
row ``2l`` is layer l's keys and ``2l+1`` its values. For GQA models PEFT sets
``num_attention_heads = num_key_value_heads`` and ``token_dim = kv_heads*d_head`` in
``adapter_config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from model_checks.family import check_prefix_fits
from prefixlab_common.errors import UserError
# Lazy imports: transformers and safetensors, inside the functions that read or build a PEFT adapter or a
# cache (heavy; the checks on the toy lab never need them). No cycle is hidden.

DATA_DIR = Path(__file__).parent / "data"
FORMAT = "prefixlab.prefix"


@dataclass
class CachePrefix:
    """Per-layer prefix keys/values, each ``[kv_heads, P, d_head]`` (post-rotary cache keys)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @property
    def prefix_len(self) -> int:
        return self.keys[0].shape[1]

    def to(self, dtype: torch.dtype) -> "CachePrefix":
        return CachePrefix([k.to(dtype) for k in self.keys], [v.to(dtype) for v in self.values], dict(self.meta))

    def check_matches(self, n_layers: int, kv_heads: int, d_head: int, what: str = "prefix") -> None:
        """UserError unless every layer is ``[kv_heads, P, d_head]`` for an `n_layers` model."""
        if self.n_layers != n_layers:
            raise UserError(f"the {what} has {self.n_layers} layers but the model has {n_layers}; use a {what} made for this model")
        for l, (k, v) in enumerate(zip(self.keys, self.values)):
            for t in (k, v):
                if t.ndim != 3 or t.shape[0] != kv_heads or t.shape[2] != d_head or t.shape[1] != k.shape[1]:
                    raise UserError(
                        f"the {what}'s layer {l} is {tuple(t.shape)} but the model needs [kv_heads={kv_heads}, P, d_head={d_head}]; use a {what} made for this model"
                    )


def prefix_cache(prefix: CachePrefix, config, layers: range | None = None, batch: int = 1):
    """A fresh `DynamicCache` holding the prefix (the cache is consumed: build one per forward)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for l in layers if layers is not None else range(prefix.n_layers):
        k = prefix.keys[l].unsqueeze(0).expand(batch, -1, -1, -1)
        v = prefix.values[l].unsqueeze(0).expand(batch, -1, -1, -1)
        cache.update(k, v, l if layers is None else l - layers.start)
    return cache


def random_prefix_layer(z_key: torch.Tensor, z_value: torch.Tensor, content_keys: torch.Tensor, content_values: torch.Tensor):
    """One layer of a random prefix: standard normals scaled to the content's per-dim RMS.

    z_*: [kv, P, d]; content_*: [T, kv, d] (cached keys after RoPE, values) -> ([kv,P,d], [kv,P,d]).
    """
    rms_k = content_keys.double().pow(2).mean(0).sqrt().clamp_min(1e-6)  # [kv, d]
    rms_v = content_values.double().pow(2).mean(0).sqrt().clamp_min(1e-6)
    k = (z_key.double() * rms_k.unsqueeze(1)).to(content_keys.dtype)
    v = (z_value.double() * rms_v.unsqueeze(1)).to(content_values.dtype)
    return k, v


def random_normals(n_layers: int, kv_heads: int, prefix_len: int, d_head: int, seed: int):
    """The seeded standard normals behind a random prefix: ([L,kv,P,d] keys, [L,kv,P,d] values)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n_layers, kv_heads, prefix_len, d_head)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def hard_prompt_prefix(model, ids: torch.Tensor) -> CachePrefix:
    """The cache the frozen model computes for the hard prompt `ids` [P] ([P] §1: a hard prompt is a prefix)."""
    from transformers import DynamicCache

    check_prefix_fits(model.config, len(ids), "hard prompt")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids.unsqueeze(0), past_key_values=cache, use_cache=True)
    keys = [layer.keys[0].detach().clone() for layer in cache.layers]
    values = [layer.values[0].detach().clone() for layer in cache.layers]
    return CachePrefix(keys, values, {"source": "hard-prompt", "ids": ids.tolist()})


def dart_lines() -> list[str]:
    """The shipped DART-style data-to-text lines (first line: the docs/papers.md §4 test sample)."""
    path = DATA_DIR / "dart_style.txt"
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def train_prefix(model, tokenizer, init: CachePrefix, bos_token_id: int | None, steps: int = 30,
                 batch_size: int = 4, lr: float = 0.05, seed: int = 0, progress=None) -> tuple[CachePrefix, list[float]]:
    """Train per-layer prefix keys/values (no-share, [L] §1) with Adam on `dart_lines()`.

    `init` is usually `hard_prompt_prefix` (the model's own cache for P BOS tokens), so training
    starts from a prefix the model has seen rather than from noise. The frozen model sees the prefix as a key/value cache, exactly as in the checks; loss is the
    mean next-token cross-entropy over each line. Returns the prefix and the loss per step.
    """
    lines = dart_lines()
    seqs = []
    for line in lines:
        ids = tokenizer(line, add_special_tokens=False).input_ids
        seqs.append(([bos_token_id] if bos_token_id is not None else []) + ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keys = [k.detach().float().clone().requires_grad_(True) for k in init.keys]
    values = [v.detach().float().clone().requires_grad_(True) for v in init.values]
    opt = torch.optim.Adam(keys + values, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    losses = []
    for p in model.parameters():
        p.requires_grad_(False)
    for step in range(steps):
        order = torch.randperm(len(seqs), generator=gen)[:batch_size].tolist()
        chosen = [seqs[i] for i in order]
        width = max(len(s) for s in chosen)
        ids = torch.full((len(chosen), width), pad, dtype=torch.long)
        labels = torch.full((len(chosen), width), -100, dtype=torch.long)
        for row, s in enumerate(chosen):
            ids[row, : len(s)] = torch.tensor(s)
            labels[row, 1 : len(s)] = torch.tensor(s[1:])  # right padding: pads come after every real token
        cache = prefix_cache(CachePrefix([k.to(dtype) for k in keys], [v.to(dtype) for v in values]), model.config, batch=len(chosen))
        with torch.enable_grad():
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(f"train prefix step {step + 1}/{steps}: loss {losses[-1]:.3f}")
    meta = dict(init.meta, source="train", steps=steps, lr=lr, batch_size=batch_size, data="model_checks/data/dart_style.txt")
    return CachePrefix([k.detach() for k in keys], [v.detach() for v in values], meta), losses


def save_prefix(prefix: CachePrefix, path: str | Path, model: str = "", source: str | None = None) -> Path:
    """Write `prefix` as a prefixlab prefix file (format in the module docstring)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for l, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
        tensors[f"layers.{l}.key"] = k.detach().contiguous().cpu()
        tensors[f"layers.{l}.value"] = v.detach().contiguous().cpu()
    info = {
        "n_layers": prefix.n_layers, "n_kv_heads": int(prefix.keys[0].shape[0]), "d_head": int(prefix.keys[0].shape[2]),
        "prefix_len": prefix.prefix_len, "dtype": str(prefix.keys[0].dtype).removeprefix("torch."),
        "source": source or prefix.meta.get("source", "unknown"), "model": model or prefix.meta.get("model", ""),
        "seed": prefix.meta.get("seed"), "keys": "post-rotary cache keys",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT, "version": "1", "prefixlab": json.dumps(info)})
    return path


def read_tagged(path: Path, fmt: str, what: str, give: str, saver: str) -> tuple[dict, dict]:
    """(metadata, tensors) of a prefixlab safetensors file whose metadata says format=`fmt`;
    a one-line UserError if it is missing, corrupt or another kind of file."""
    from safetensors import safe_open
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; give {give}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:
        raise UserError(f"{path} is not a readable safetensors file ({type(err).__name__}); the {what} file is corrupt") from None
    if meta.get("format") != fmt:
        raise UserError(f"{path} is not a prefixlab {what} file (metadata format={meta.get('format')!r}); "
                        f"save it with {saver}")
    return meta, tensors


def load_prefix(path: str | Path) -> CachePrefix:
    """Read a prefixlab prefix file; UserError if it is missing, corrupt or not one."""
    path = Path(path)
    meta, tensors = read_tagged(path, FORMAT, "prefix", "'random', 'train' or a .safetensors prefix file", "save_prefix")
    try:
        info = json.loads(meta["prefixlab"])
        n = int(info["n_layers"])
        keys = [tensors[f"layers.{l}.key"] for l in range(n)]
        values = [tensors[f"layers.{l}.value"] for l in range(n)]
    except (KeyError, ValueError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is an incomplete prefix file (missing {err}); re-save it with save_prefix") from None
    return CachePrefix(keys, values, dict(info, file=str(path)))


def load_peft_prefix(adapter_dir: str | Path, n_layers: int, kv_heads: int, d_head: int) -> CachePrefix:
    """A PEFT prefix-tuning adapter directory as a `Prefix` (layout in the module docstring)."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file():
        raise UserError(f"{adapter_dir} has no adapter_config.json; point --adapter at a PEFT adapter directory")
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise UserError(f"{adapter_dir} holds a pickle adapter_model.bin, which prefixlab never loads; re-save it with safe_serialization=True")
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors; the adapter is incomplete")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{config_file} is not valid JSON; the adapter is corrupt") from None
    if config.get("peft_type") != "PREFIX_TUNING":
        raise UserError(f"{adapter_dir} is a {config.get('peft_type')!r} adapter; only PEFT PREFIX_TUNING adapters hold a prefix")
    P = config.get("num_virtual_tokens")
    if config.get("num_layers") != n_layers or config.get("num_attention_heads") != kv_heads or config.get("token_dim") != kv_heads * d_head:
        raise UserError(
            f"the adapter (num_layers={config.get('num_layers')}, num_attention_heads={config.get('num_attention_heads')}, "
            f"token_dim={config.get('token_dim')}) does not match the model (layers={n_layers}, kv_heads={kv_heads}, "
            f"kv_heads*d_head={kv_heads * d_head}); use an adapter trained on this model"
        )
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = list(handle.keys())
            name = next(n for n in names if n.endswith("prompt_embeddings"))
            emb = handle.get_tensor(name)
    except StopIteration:
        raise UserError(f"{weights} has no prompt_embeddings tensor; is it a prefix-tuning adapter?") from None
    except Exception as err:
        raise UserError(f"{weights} is not a readable safetensors file ({type(err).__name__}); the adapter is corrupt") from None
    if emb.ndim != 2 or emb.shape != (P, n_layers * 2 * kv_heads * d_head):
        raise UserError(
            f"the adapter's prompt_embeddings is {tuple(emb.shape)}, expected [{P}, {n_layers * 2 * kv_heads * d_head}] for this model; use an adapter trained on this model"
        )
    kv = emb.view(P, n_layers * 2, kv_heads, d_head).permute(1, 2, 0, 3)  # [L*2, kv, P, d]
    keys = [kv[2 * l].contiguous() for l in range(n_layers)]
    values = [kv[2 * l + 1].contiguous() for l in range(n_layers)]
    return CachePrefix(keys, values, {"source": "peft", "adapter": str(adapter_dir), "base_model": config.get("base_model_name_or_path")})


def prefix_from_source(prefix: str, adapter: str | None, n_layers: int, kv_heads: int, d_head: int, prefix_len: int,
                       seed: int, content_kv: Callable[[int], tuple] | None) -> CachePrefix:
    """The prefix from its source: a PEFT adapter, ``random`` (also the start of ``train``, whose
    training is the caller's) or a prefix file. `content_kv(l)` gives layer l's content
    keys/values ``[T, kv, d]``, the scale of a random prefix (unused for the other sources)."""
    if adapter is not None:
        return load_peft_prefix(adapter, n_layers, kv_heads, d_head)
    if prefix in ("random", "train"):
        zk, zv = random_normals(n_layers, kv_heads, prefix_len, d_head, seed)
        keys, values = [], []
        for l in range(n_layers):
            k, v = random_prefix_layer(zk[l], zv[l], *content_kv(l))
            keys.append(k)
            values.append(v)
        return CachePrefix(keys, values, {"source": "random", "seed": seed})
    pre = load_prefix(prefix)
    pre.check_matches(n_layers, kv_heads, d_head, "prefix file")
    return pre
