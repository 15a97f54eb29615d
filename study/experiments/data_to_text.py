"""[L]'s language experiments, in miniature: prefix-tuning a frozen SmolLM2-135M on data-to-text at
several training-set sizes n, No-share against Deep-share (docs/papers.md §1, §6, §6b).

[L] (and Li & Liang before them) tuned GPT-2 on E2E and BART on XSUM; neither data set installs
offline, so the task is `study.experiments.d2t_data`'s E2E-like grammar. The prefix enters the frozen
model as a `DynamicCache` of P post-rotary keys/values per layer (`model_checks.prefix`), and the
three parameterizations produce that cache:

- ``none``   (No-share): free keys and values per layer, ``[kv_heads, P, d_head]`` each.
- ``deep``   (Deep-share, Li & Liang's reparameterization): P learned vectors p' in R^d through one
  MLP shared by all layers, d -> 512 -> tanh -> n_layers*2*kv_heads*d_head, read as every layer's
  keys and values. Its output is *added* to the start prefix and its last layer starts at zero, so
  training starts at the same prefix as the others (as the toy's `tuning.prefix` `init="slot"`);
  `fold()` evaluates the MLP once into a No-share `Prefix` for evaluation and generation.
- ``simple`` (Simple-share, [P]'s prefix): one residual vector per layer and slot through the
  layer's frozen input RMSNorm and k/v projections; the key then gets the rotary map *of its slot
  position i* (0..P-1), exactly what a real token at position i would get, so the content at
  P..P+T-1 sees it at the usual relative offset.

Every variant starts at the model's own cache for a fixed P-token hard prompt (`START_TEXT`), so
step 0 is the same prefix for all of them; `base` in the result is its loss. Training: AdamW (no
weight decay), constant lr, teacher-forced mean token NLL on the target sentence (+ EOS); the prefix
with the best validation loss (checked every `eval_every` steps) is kept, and each variant's lr is
chosen per n on the validation split from its grid. The test set is used only to report.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from model_checks.models import load_model
from model_checks.prefix import CachePrefix, hard_prompt_prefix, prefix_cache
from prefixlab_common.errors import UserError
from prefixlab_common.progress import Progress
from study.experiments.d2t_data import Example, grammar_summary, make_splits
from toy_models.training import resolve_device
# Lazy import: transformers' LLaMA rotary helper, inside Simple-share's key construction only (heavy). No
# cycle is hidden.

SHARES = ("none", "simple", "deep")
START_TEXT = "Describe the restaurant in one sentence from its attributes:"
DEEP_HIDDEN = 512  # Li & Liang's MLP width (docs/papers.md §6b)
# The MLP about 100x lower than the direct parameterizations, as in [L]'s and Li & Liang's commands.
DEFAULT_LRS = {"none": (1e-2, 3e-2), "simple": (1e-3, 3e-3), "deep": (1e-4, 3e-4)}
# the settings of each scale (`--scale`; the study's paper scale runs "paper", or "micro" without SmolLM2)
SCALES = {
    # structure only: the tiny random LLaMA, a few steps (tests)
    "micro": dict(model="tiny", shares=("none", "simple", "deep"), sizes=(4, 8), steps=3, prefix_len=2,
                  seeds=(0, 1), batch_size=2, n_val=4, n_test=4, eval_every=2, lrs={"none": (1e-2,), "simple": (1e-3,), "deep": (1e-3, 1e-4)},
                  n_generate=2, max_new_tokens=8),
    # about 30 min of one CPU core on SmolLM2 (measured: docs/llama.md); lrs from the n=16 screen there
    "quick": dict(model="smollm2", shares=("none", "deep"), sizes=(16, 64, 256), steps=50, prefix_len=5, seeds=(0, 1),
                  batch_size=4, n_val=24, n_test=48, eval_every=10, lrs={"none": (3e-2,), "deep": (3e-4,)},
                  n_generate=3, max_new_tokens=40),
    # the full analogue: hours on 2 CPU cores, minutes on a GPU
    "paper": dict(model="smollm2", shares=("none", "simple", "deep"), sizes=(16, 64, 256, 1024), steps=400,
                  prefix_len=5, seeds=(0, 1, 2), batch_size=8, n_val=64, n_test=200, eval_every=50,
                  lrs=DEFAULT_LRS, n_generate=4, max_new_tokens=48),
}


# ------------------------------------------------------------------------------------------------
# Tokenized examples and the loss.


@dataclass
class TokenBatch:
    ids: torch.Tensor  # [B, T], right-padded
    labels: torch.Tensor  # [B, T], -100 outside the target: labels[:, t] is the token at t


def encode(tokenizer, bos: int | None, ex: Example) -> tuple[list[int], int]:
    """[BOS] MR "\\n" target EOS as ids, and where the target starts."""
    prompt = ([bos] if bos is not None else []) + tokenizer(ex.mr + "\n", add_special_tokens=False).input_ids
    target = tokenizer(ex.text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt + target, len(prompt)


def collate(seqs: list[tuple[list[int], int]], pad: int) -> TokenBatch:
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, (s, start) in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        labels[row, start : len(s)] = torch.tensor(s[start:])  # right padding: pads follow the real tokens
    return TokenBatch(ids, labels)


def target_nll(model, prefix: CachePrefix, batch: TokenBatch, device: str) -> tuple[torch.Tensor, int]:
    """Summed NLL of the target tokens (teacher forced) under `prefix`, and their count.

    The LM head runs only at the positions that predict a target token (the head is ~20% of a
    SmolLM2 forward, and most positions are the input record)."""
    ids, labels = batch.ids.to(device), batch.labels.to(device)
    cache = prefix_cache(prefix, model.config, batch=ids.shape[0])
    hidden = model.model(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
    want = labels[:, 1:] != -100
    logits = model.lm_head(hidden[:, :-1][want])
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][want], reduction="sum"), int(want.sum())


@torch.no_grad()
def mean_nll(model, prefix: CachePrefix, seqs: list, batch_size: int, pad: int, device: str) -> float:
    """Mean token NLL of the targets of `seqs` (token-weighted over the whole set)."""
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        nll, n = target_nll(model, prefix, collate(seqs[i : i + batch_size], pad), device)
        total, count = total + float(nll), count + n
    return total / max(count, 1)


@torch.no_grad()
def greedy(model, tokenizer, prefix: CachePrefix, prompt: list[int], max_new_tokens: int, device: str) -> str:
    """Greedy continuation of `prompt` under `prefix`, stopped at EOS or a newline."""
    cache = prefix_cache(prefix, model.config, batch=1)
    ids = torch.tensor([prompt], device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
        if "\n" in tokenizer.decode([token]):
            break
        ids = torch.tensor([[token]], device=device)
    return tokenizer.decode(out).strip()


# ------------------------------------------------------------------------------------------------
# The three parameterizations.


def rotate_keys(model, keys: torch.Tensor) -> torch.Tensor:
    """Keys [kv, P, d_head] before RoPE -> after it, slot i at position i (a token at position i)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    positions = torch.arange(keys.shape[1], device=keys.device).unsqueeze(0)
    cos, sin = model.model.rotary_emb(keys, positions)
    k = keys.unsqueeze(0)
    return apply_rotary_pos_emb(k, k, cos, sin)[1][0]


def residual_to_kv(model, layer: int, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual vectors [P, d] through layer `layer`'s frozen input norm and k/v maps (+ RoPE)."""
    block = model.model.layers[layer]
    attn = block.self_attn
    x = block.input_layernorm(resid)
    d_head = attn.head_dim
    k = attn.k_proj(x).view(resid.shape[0], -1, d_head)
    if hasattr(attn, "k_norm"):  # Qwen3 normalizes keys per head before RoPE
        k = attn.k_norm(k)
    v = attn.v_proj(x).view(resid.shape[0], -1, d_head)
    return rotate_keys(model, k.transpose(0, 1)), v.transpose(0, 1)


def start_ids(tokenizer, bos: int | None, prefix_len: int) -> list[int]:
    """The P start tokens: BOS, then `START_TEXT` (repeated if P is longer), cut to P."""
    text = tokenizer(START_TEXT, add_special_tokens=False).input_ids
    ids = ([bos] if bos is not None else []) + text * (1 + prefix_len // max(len(text), 1))
    return ids[:prefix_len]


def start_residuals(model, ids: list[int]) -> torch.Tensor:
    """[n_layers, P, d]: each layer's residual input at the start tokens (Simple-share's start)."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True).hidden_states
    return torch.stack([h[0] for h in hidden[: model.config.num_hidden_layers]])


class PrefixParams(nn.Module):
    """A trainable prefix in one of `SHARES`; `prefix()` gives the per-layer cache layout."""

    def __init__(self, model, share: str, start: CachePrefix, start_resid: torch.Tensor | None = None,
                 hidden: int = DEEP_HIDDEN, seed: int = 0):
        super().__init__()
        if share not in SHARES:
            raise UserError(f"unknown prefix share {share!r}; use one of {', '.join(SHARES)}")
        self.share, self.model = share, [model]  # a list: the frozen model is not a submodule
        self.L, self.P = start.n_layers, start.prefix_len
        self.kv, self.dh = start.keys[0].shape[0], start.keys[0].shape[2]
        kv0 = torch.stack([torch.stack([k, v]) for k, v in zip(start.keys, start.values)]).float()  # [L, 2, kv, P, dh]
        if share == "none":
            self.kv_free = nn.Parameter(kv0.clone())
        elif share == "simple":
            if start_resid is None:
                raise ValueError("simple-share needs the start residuals")
            self.resid = nn.Parameter(start_resid.detach().float().clone())
        else:
            gen = torch.Generator().manual_seed(seed)
            d = model.config.hidden_size
            self.p = nn.Parameter(torch.randn(self.P, d, generator=gen))
            self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, self.L * 2 * self.kv * self.dh))
            nn.init.normal_(self.mlp[0].weight, std=d ** -0.5, generator=gen)
            nn.init.zeros_(self.mlp[0].bias)
            nn.init.zeros_(self.mlp[2].weight)  # start at the start prefix (as LoRA's B = 0)
            nn.init.zeros_(self.mlp[2].bias)
            self.register_buffer("kv0", kv0)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def prefix(self) -> CachePrefix:
        """The per-layer keys/values [kv, P, dh] (differentiable)."""
        if self.share == "none":
            kv = self.kv_free
        elif self.share == "simple":
            pairs = [residual_to_kv(self.model[0], l, self.resid[l]) for l in range(self.L)]
            return CachePrefix([k for k, _ in pairs], [v for _, v in pairs])
        else:
            out = self.mlp(self.p)  # [P, L*2*kv*dh]; PEFT's layout: slot, then (layer, k/v, head, dim)
            kv = out.view(self.P, self.L, 2, self.kv, self.dh).permute(1, 2, 3, 0, 4) + self.kv0
        return CachePrefix(list(kv[:, 0].unbind(0)), list(kv[:, 1].unbind(0)))

    @torch.no_grad()
    def fold(self) -> CachePrefix:
        """Explicit keys/values (a No-share prefix with the same forward): for evaluation and export."""
        p = self.prefix()
        return CachePrefix([k.detach().clone() for k in p.keys], [v.detach().clone() for v in p.values],
                      {"source": f"data-to-text {self.share}-share"})


# ------------------------------------------------------------------------------------------------
# One training run and the study.


def train_one(model, params: PrefixParams, train: list, val: list, steps: int, lr: float, batch_size: int,
              eval_every: int, pad: int, seed: int, device: str) -> dict:
    """AdamW at a constant lr on `train`; keeps the prefix with the best validation loss."""
    opt = torch.optim.AdamW([p for p in params.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    best = (mean_nll(model, params.fold(), val, batch_size, pad, device), 0, params.fold())
    curve = [[0, best[0]]]
    losses = []
    for step in range(1, steps + 1):
        if len(order) < batch_size:  # epochs of a seeded permutation; small n repeats its samples
            order += torch.randperm(len(train), generator=gen).tolist() * math.ceil(batch_size / len(train))
        chosen, order = order[:batch_size], order[batch_size:]
        nll, count = target_nll(model, params.prefix(), collate([train[i] for i in chosen], pad), device)
        loss = nll / count
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            v = mean_nll(model, params.fold(), val, batch_size, pad, device)
            curve.append([step, v])
            if v < best[0]:
                best = (v, step, params.fold())
    return {"val_loss": best[0], "best_step": best[1], "prefix": best[2], "val_curve": curve,
            "train_loss_first": losses[0], "train_loss_last": statistics.fmean(losses[-min(10, len(losses)):])}


def check_inputs(shares, sizes, steps, prefix_len, seeds, batch_size, lrs, n_val, n_test, eval_every) -> dict:
    """One-line UserErrors for what a user can get wrong; returns {share: lr grid}."""
    shares = tuple(shares)
    if not shares:
        raise UserError("give at least one prefix share: none, simple or deep")
    for s in shares:
        if s not in SHARES:
            raise UserError(f"unknown prefix share {s!r}; use one of {', '.join(SHARES)}")
    if len(set(shares)) != len(shares):
        raise UserError(f"prefix shares repeat in {','.join(shares)}; give each once")
    if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes):
        raise UserError(f"training-set sizes must be positive integers, got {list(sizes)}")
    for name, value in (("steps", steps), ("prefix length P", prefix_len), ("batch size", batch_size),
                        ("validation size", n_val), ("test size", n_test), ("eval_every", eval_every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"the {name} must be a positive integer, got {value!r}")
    if not seeds:
        raise UserError("give at least one seed")
    grid = {}
    for s in shares:
        raw = (lrs or {}).get(s, DEFAULT_LRS[s])
        raw = (raw,) if isinstance(raw, (int, float)) else tuple(raw)
        if not raw or any(not isinstance(x, (int, float)) or not 0 < x < 10 for x in raw):
            raise UserError(f"the learning rates for {s}-share must be positive numbers below 10, got {list(raw)}")
        grid[s] = raw
    unknown = set(lrs or {}) - set(SHARES)
    if unknown:
        raise UserError(f"learning rates given for unknown share(s) {', '.join(sorted(unknown))}; use none, simple or deep")
    return grid


def parse_lrs(items) -> dict:
    """``["none=1e-2,3e-2", "deep=3e-4"]`` (the CLI's --lr) -> {share: (lr, ...)}; UserError if malformed."""
    out = {}
    for item in items or ():
        share, eq, values = str(item).partition("=")
        share = share.strip()
        if not eq or share not in SHARES:
            raise UserError(f"--lr takes SHARE=LR[,LR...] with SHARE one of {', '.join(SHARES)}, got {item!r}")
        try:
            out[share] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise UserError(f"--lr {item!r}: the learning rates must be numbers, e.g. deep=1e-4,3e-4") from None
    return out


def pick_device(device) -> str:
    """cpu, cuda, cuda:N, mps or auto (toy_models.training's rule); a device torch lacks is a UserError."""
    return str(resolve_device(device))


def run_data_to_text(model: str = "smollm2", shares=("none", "deep"), sizes=(16, 128), steps: int = 60,
                     lrs: dict | None = None, prefix_len: int = 5, seeds=(0,), batch_size: int = 4,
                     device: str = "cpu", progress: Progress | None = None, n_val: int = 24, n_test: int = 48,
                     eval_every: int = 20, data_seed: int = 0, n_generate: int = 3, max_new_tokens: int = 48) -> dict:
    """Prefix-tune the frozen `model` at each training size in `sizes`, per share, lr and seed; per
    share and n pick the lr with the lowest mean validation loss and report its test loss over seeds
    (docs/papers.md §6b: [L] and Li & Liang chose each method's lr on validation data)."""
    grid = check_inputs(shares, sizes, steps, prefix_len, seeds, batch_size, lrs, n_val, n_test, eval_every)
    device = pick_device(device)
    t0 = time.perf_counter()
    loaded = load_model(model)
    lm, tok = loaded.model.to(device), loaded.tokenizer
    for p in lm.parameters():
        p.requires_grad_(False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = make_splits(data_seed, max(sizes), n_val, n_test)
    enc = {s: [encode(tok, loaded.bos_token_id, ex) for ex in data[s]] for s in data}
    ids0 = start_ids(tok, loaded.bos_token_id, prefix_len)
    start = hard_prompt_prefix(lm, torch.tensor(ids0, device=device))
    resid0 = start_residuals(lm, ids0) if "simple" in grid else None
    base = {"val_loss": mean_nll(lm, start, enc["val"], batch_size, pad, device),
            "test_loss": mean_nll(lm, start, enc["test"], batch_size, pad, device)}
    jobs = [(s, n, lr, seed) for n in sorted(sizes) for s in grid for lr in grid[s] for seed in seeds]
    runs, folded = [], {}
    for i, (share, n, lr, seed) in enumerate(jobs):
        t = time.perf_counter()
        params = PrefixParams(lm, share, start, resid0, seed=seed).to(device)
        out = train_one(lm, params, enc["train"][:n], enc["val"], steps, lr, batch_size, eval_every, pad, seed, device)
        test = mean_nll(lm, out["prefix"], enc["test"], batch_size, pad, device)
        run = {"share": share, "n": n, "lr": lr, "seed": seed, "steps": steps, "test_loss": test, "n_params": params.n_params(),
               "seconds": time.perf_counter() - t, **{k: v for k, v in out.items() if k != "prefix"}}
        runs.append(run)
        folded[(share, n, lr, seed)] = out["prefix"]
        if progress:
            progress(i + 1, len(jobs), {k: run[k] for k in ("share", "n", "lr", "seed", "val_loss", "test_loss", "seconds")})
    results = summarize(runs, grid, sizes, seeds)
    examples = data["test"][:n_generate]
    for share, per_n in results.items():
        for n, r in per_n.items():
            prefix = folded[(share, int(n), r["lr"], seeds[0])]
            r["generations"] = [{**ex.to_json(), "output": greedy(lm, tok, prefix, enc["test"][j][0][: enc["test"][j][1]],
                                                                  max_new_tokens, device)}
                                for j, ex in enumerate(examples)]
    base["generations"] = [{**ex.to_json(), "output": greedy(lm, tok, start, enc["test"][j][0][: enc["test"][j][1]],
                                                             max_new_tokens, device)} for j, ex in enumerate(examples)]
    return {"task": "data-to-text (E2E-like grammar)", "model": loaded.name, "device": device,
            "torch_threads": torch.get_num_threads(),
            "config": {"shares": list(grid), "sizes": sorted(sizes), "steps": steps, "lrs": {s: list(g) for s, g in grid.items()},
                       "prefix_len": prefix_len, "seeds": list(seeds), "batch_size": batch_size, "n_val": n_val,
                       "n_test": n_test, "eval_every": eval_every, "data_seed": data_seed, "optimizer": "AdamW, wd 0, constant lr",
                       "deep_hidden": DEEP_HIDDEN, "start": tok.decode(ids0)},
            "data": {"grammar": grammar_summary(), "train_examples": [e.to_json() for e in data["train"][:3]]},
            "base": base, "runs": runs, "results": results, "seconds": time.perf_counter() - t0}


def summarize(runs: list[dict], grid: dict, sizes, seeds) -> dict:
    """Per share and n: the lr with the lowest mean validation loss, and its test loss over seeds."""
    out: dict = {}
    for share in grid:
        out[share] = {}
        for n in sorted(sizes):
            by_lr = {lr: [r for r in runs if r["share"] == share and r["n"] == n and r["lr"] == lr] for lr in grid[share]}
            lr = min(by_lr, key=lambda x: statistics.fmean(r["val_loss"] for r in by_lr[x]))
            chosen = by_lr[lr]
            tests = [r["test_loss"] for r in chosen]
            out[share][str(n)] = {
                "lr": lr, "val_loss": statistics.fmean(r["val_loss"] for r in chosen),
                "val_loss_by_lr": {str(x): statistics.fmean(r["val_loss"] for r in rs) for x, rs in by_lr.items()},
                "test_loss_mean": statistics.fmean(tests), "test_loss_std": statistics.stdev(tests) if len(tests) > 1 else None,
                "test_losses": tests, "steps": chosen[0]["steps"] if "steps" in chosen[0] else None,
                "best_steps": [r["best_step"] for r in chosen], "seconds": sum(r["seconds"] for rs in by_lr.values() for r in rs),
                "n_params": chosen[0]["n_params"]}
    return out


# ------------------------------------------------------------------------------------------------
# The paper-vs-lab row.

CLAIM = "[L] language (stand-in for E2E/XSUM and FGVC)"
PAPER = ("Deep-share (Li & Liang's reparameterized prefix) is more sample-efficient than No-share: lower loss "
         "at small n (E2E/XSUM low-data; FGVC 88.3 vs 82.3), the gap closing as n grows")
CRITERION = ("reproduced iff at the smallest n No-share's mean test NLL exceeds Deep-share's by more than the sum of "
             "their seed standard deviations, and the gap at the largest n is smaller than at the smallest")


def table_row(result: dict) -> dict:
    """{"claim", "paper", "lab", "holds", "criterion", "gap"} from a `run_data_to_text` result."""
    res = result.get("results", {})
    row = {"claim": CLAIM, "paper": PAPER, "criterion": CRITERION}
    if "none" not in res or "deep" not in res:
        return {**row, "lab": "not run with both No-share and Deep-share", "holds": None, "gap": "no comparison"}
    sizes = sorted(int(n) for n in res["deep"])
    small, large = str(sizes[0]), str(sizes[-1])
    cell = lambda s, n: f"{res[s][n]['test_loss_mean']:.3f}" + (
        f"±{res[s][n]['test_loss_std']:.3f}" if res[s][n]["test_loss_std"] is not None else "")
    lab = "; ".join(f"n={n}: No-share {cell('none', n)}, Deep-share {cell('deep', n)}" for n in map(str, sizes))
    lab = f"{result.get('model', '?')} test NLL/token, {len(result['config']['seeds'])} seed(s): {lab}"
    gap = lambda n: res["none"][n]["test_loss_mean"] - res["deep"][n]["test_loss_mean"]
    g_small, g_large = gap(small), gap(large)
    gap_text = f"No-share − Deep-share: {g_small:+.3f} at n={small}, {g_large:+.3f} at n={large}"
    stds = [res[s][small]["test_loss_std"] for s in ("none", "deep")]
    if None in stds or len(sizes) < 2:
        return {**row, "lab": lab, "holds": None, "gap": gap_text + " (needs at least 2 seeds and 2 sizes for a verdict)"}
    spread = sum(stds)
    holds = g_small > spread and g_large < g_small
    return {**row, "lab": lab, "holds": bool(holds), "gap": f"{gap_text}; seed spread at n={small}: {spread:.3f}"}


def run_scale(scale: str, device: str = "cpu", progress: Progress | None = None, **overrides) -> dict:
    """`run_data_to_text` with a scale's settings (micro, quick, paper), plus `table_row`."""
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    result = run_data_to_text(**{**SCALES[scale], **overrides}, device=device, progress=progress)
    result["preset"] = scale  # the result's key for its scale, as cached paper studies hold it
    result["table_row"] = table_row(result)
    return result


# ------------------------------------------------------------------------------------------------
# Cost.


def measure_step_seconds(model: str = "smollm2", shares=("none", "deep"), batch_size: int = 4, prefix_len: int = 5,
                         threads=(1, 2), steps: int = 3, device: str = "cpu") -> dict:
    """Seconds per training step (forward + backward + AdamW on a training batch of the task's records)
    per share and torch thread count; the first step of each is a warm-up and not counted."""
    device = pick_device(device)
    check_inputs(shares, (1,), steps, prefix_len, (0,), batch_size, None, 1, 1, 1)
    loaded = load_model(model)
    lm, tok = loaded.model.to(device), loaded.tokenizer
    for p in lm.parameters():
        p.requires_grad_(False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = make_splits(0, batch_size * (steps + 1), 1, 1)
    enc = [encode(tok, loaded.bos_token_id, ex) for ex in data["train"]]
    ids0 = start_ids(tok, loaded.bos_token_id, prefix_len)
    start = hard_prompt_prefix(lm, torch.tensor(ids0, device=device))
    resid0 = start_residuals(lm, ids0) if "simple" in shares else None
    before = torch.get_num_threads()
    out = {"model": loaded.name, "batch_size": batch_size, "prefix_len": prefix_len, "device": device,
           "mean_tokens_per_sequence": statistics.fmean(len(s) for s, _ in enc), "seconds_per_step": {}}
    try:
        for t in threads if device == "cpu" else (before,):
            torch.set_num_threads(t)
            for share in shares:
                params = PrefixParams(lm, share, start, resid0).to(device)
                opt = torch.optim.AdamW(params.parameters(), lr=1e-4, weight_decay=0.0)
                times = []
                for i in range(steps + 1):
                    t0 = time.perf_counter()
                    nll, count = target_nll(lm, params.prefix(), collate(enc[i * batch_size : (i + 1) * batch_size], pad), device)
                    opt.zero_grad()
                    (nll / count).backward()
                    opt.step()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                out["seconds_per_step"][f"{share}@{t}"] = statistics.median(times[1:])
    finally:
        torch.set_num_threads(before)
    return out


def estimate_seconds(scale_or_config, step_seconds: float) -> dict:
    """Training steps and the seconds they take at `step_seconds` per step (evaluation: an
    inference forward counted as a third of a training step per batch; load and generation apart)."""
    cfg = SCALES[scale_or_config] if isinstance(scale_or_config, str) else scale_or_config
    lrs = cfg.get("lrs") or DEFAULT_LRS
    n_runs = sum(len(lrs.get(s, DEFAULT_LRS[s])) for s in cfg["shares"]) * len(cfg["sizes"]) * len(cfg["seeds"])
    evals = cfg["steps"] // cfg["eval_every"] + 1
    eval_batches = evals * math.ceil(cfg["n_val"] / cfg["batch_size"]) + math.ceil(cfg["n_test"] / cfg["batch_size"])
    per_run = cfg["steps"] + eval_batches / 3
    return {"runs": n_runs, "train_steps": n_runs * cfg["steps"], "step_equivalents": n_runs * per_run,
            "seconds": n_runs * per_run * step_seconds}
