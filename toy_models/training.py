"""One generic training loop, used by pretraining and by every tuning method.
(One file: `fit` is `fit_many` with one run, and the fused runs' folding, per-run optimizers and
checkpoints belong to the same loop.)

nothing here knows which method is trained: a method is a set of trainable tensors and a function
that turns them into a `MethodState` for the frozen model's forward (minGPT's "generic trainer").

Determinism: the data of step s come from `step_rng(seed, s)` and dropout is reseeded per step,
and the learning rate is a pure function of the step. So a run resumed from a checkpoint sees
exactly what an uninterrupted run would, and ends with the same metrics.
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from prefixlab_common.errors import UserError
from prefixlab_common.progress import Progress
from toy_models.model import MethodState, ToyTransformer
from toy_models.precision import precision_of
from toy_models.runs import RunDir, load_tensors_meta, save_tensors
from toy_models.tasks import Batch, ResolvedTask, TaskSpec, sample_batch, step_rng, fixed_test_set


SCHEDULES = ("cosine", "constant", "decay")


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    # "cosine" (after warmup, to min_lr_frac * lr), "constant", or "decay": constant, then a linear
    # decay to min_lr_frac * lr over the run's last decay_frac (a cure for a constant lr's end-of-run
    # oscillation that keeps its plateau crossing)
    schedule: str = "cosine"
    warmup: int = 100
    min_lr_frac: float = 0.1
    decay_frac: float = 0.2
    weight_decay: float = 0.1  # on matrices only (not biases, LayerNorms, embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_size: int = 1000
    seed: int = 0
    train_mode: bool = True  # dropout on; [P] tuned prefixes with the model in eval mode
    stop_at: float | None = None  # stop early once exact accuracy reaches this (0..1)
    train_size: int | None = None  # a fixed pool of this many training examples (None: fresh samples)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if self.warmup < 0:
            raise UserError(f"warmup must be >= 0, got {self.warmup}")
        if self.train_size is not None and self.train_size <= 0:
            raise UserError(f"train-size must be positive, got {self.train_size}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; use {', '.join(SCHEDULES[:-1])} or {SCHEDULES[-1]}")
        if not 0 < self.decay_frac <= 1:
            raise UserError(f"decay-frac must be in (0, 1], got {self.decay_frac}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "decay":
            start = self.steps - max(1, round(self.decay_frac * self.steps))
            if step < start:
                return self.lr
            t = (step - start + 1) / (self.steps - start)
            return self.lr * (1 - (1 - self.min_lr_frac) * t)
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.schedule != "decay":  # only the decay schedule reads it: other runs keep their configs
            del d["decay_frac"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------------------------
# Devices.

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """None -> cpu (the project never needs a GPU); "auto" -> a GPU when torch sees one;
    "cpu", "cuda", "cuda:N", "mps". A device torch cannot use here is a UserError."""
    if isinstance(name, torch.device):
        return name
    if name is None or name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = str(name).partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device cuda is not available: torch sees no CUDA GPU here (use --device cpu or auto)")
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UserError(f"device {name} does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
        return torch.device(str(name))
    if kind == "mps" and not index:
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise UserError("device mps is not available: torch sees no Apple GPU here (use --device cpu or auto)")
        return torch.device("mps")
    raise UserError(f"unknown device {name!r}; use one of {', '.join(DEVICES)} (or cuda:N)")


def device_info(device: torch.device, precision: str = "fp32") -> dict:
    """What a run records about where and how it trained (provenance.json, not config.json: a run
    may resume on another device); precision: the resolved one, "fp32" or "bf16"."""
    info = {"device": str(device), "precision": precision, "autocast": "bf16" if precision == "bf16" else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _use_amp(device: torch.device, amp: bool | None) -> bool:
    """bf16 autocast of the training forward (toy_models/precision.py): by default on CUDA GPUs
    that support bf16; on the CPU only when asked (amp=True)."""
    return precision_of(device, amp) == "bf16"


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Loss and metrics.


def output_logits(model: ToyTransformer, batch: Batch, state: MethodState | None) -> torch.Tensor:
    """Logits that predict Y: [batch, L, vocab] (from the last X position on)."""
    return model(batch.content, state, last=batch.x.shape[1])


def loss_on(model: ToyTransformer, batch: Batch, state: MethodState | None) -> torch.Tensor:
    logits = output_logits(model, batch, state)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.y.reshape(-1))


@torch.no_grad()
def evaluate(model: ToyTransformer, state: MethodState | None, batch: Batch, greedy: bool = True,
             provide_first: bool = False, chunk: int = 500) -> dict:
    """exact_acc: share of samples whose greedy decoding gets every output right.
    It is computed from one teacher-forced forward, which is exactly equivalent: greedy decoding
    reproduces Y iff every argmax given the true earlier outputs is right (induction on t).
    token_acc: per-token accuracy of real greedy decoding (when greedy=True).
    provide_first: y1 is given and only y2..yL are scored: the lab's convention for mix4, whose y1
    cannot be known (the task has no indicator; y1 is what reveals it). [P] scored mix4 without y1
    (docs/papers.md §3b)."""
    was_training = model.training
    model.eval()
    s = 1 if provide_first else 0
    exact, tf_tok, greedy_tok = [], [], []
    try:
        dev = _model_device(model)
        for i in range(0, len(batch), chunk):
            b = Batch(batch.x[i:i + chunk].to(dev), batch.y[i:i + chunk].to(dev), batch.which[i:i + chunk].to(dev))
            ok = output_logits(model, b, state)[:, s:].argmax(-1) == b.y[:, s:]
            exact.append(ok.all(1))
            tf_tok.append(ok.float().mean(1))
            if greedy:
                prompt = torch.cat([b.x, b.y[:, :s]], dim=1)
                gen = model.generate(prompt, b.y.shape[1] - s, state)
                greedy_tok.append((gen == b.y[:, s:]).float().mean(1))
    finally:
        model.train(was_training)
    out = {"exact_acc": torch.cat(exact).float().mean().item(),
           "teacher_forced_token_acc": torch.cat(tf_tok).mean().item(), "n": len(batch),
           "provide_first": provide_first}
    if greedy:
        out["token_acc"] = torch.cat(greedy_tok).mean().item()
    return out


# --------------------------------------------------------------------------------------------
# The loop.

# Progress (prefixlab_common.progress): (step, total, info) -> None, imported above


@dataclass
class Trainable:
    """What the loop trains: named leaf tensors and how they become a MethodState."""

    params: dict[str, torch.nn.Parameter]
    to_state: Callable[[], MethodState]
    no_decay: Callable[[str, torch.Tensor], bool] = lambda name, p: p.ndim < 2


@dataclass
class Member:
    """One run of a (possibly fused) training group: its own trainable tensors, task, config
    (seed, lr, schedule, ...), data stream, optimizer, clipping, evaluation and run directory."""

    tr: Trainable
    task: ResolvedTask
    cfg: TrainConfig
    run: RunDir | None = None
    resume: bool = False
    test: Batch | None = None


def _optimizer(tr: Trainable, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in tr.params.items() if not tr.no_decay(n, p)]
    no_decay = [p for n, p in tr.params.items() if tr.no_decay(n, p)]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # torch's default implementation (foreach and fused variants measured no faster here:
    # benchmarks/bench_training.py, avenues)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _save_train_state(run: RunDir, step: int, tr: Trainable, opt: torch.optim.Optimizer) -> None:
    tensors = {f"param.{n}": p for n, p in tr.params.items()}
    names = list(tr.params)
    index = {id(p): names[i] for i, p in enumerate(tr.params.values())}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                tensors[f"opt.{index[id(p)]}.{k}"] = v if v.ndim else v.reshape(1)
    # the step goes into the tensors' own file as well: a kill between the two writes below then
    # resumes from the step the tensors belong to, not from the step before
    save_tensors(run.path / "train_state.safetensors", tensors, meta={"step": step})  # saved from CPU copies
    run.write_json("train_state.json", {"step": step})


def _load_train_state(run: RunDir, tr: Trainable, opt: torch.optim.Optimizer) -> int:
    tensors, meta = load_tensors_meta(run.path / "train_state.safetensors")
    # the tensors' own step (train_state.json's for a checkpoint written before it was kept there)
    step = meta["step"] if "step" in meta else run.read_json("train_state.json")["step"]
    with torch.no_grad():
        for n, p in tr.params.items():
            if f"param.{n}" not in tensors or tensors[f"param.{n}"].shape != p.shape:
                raise UserError(f"train state in {run.path} does not match this run; use --overwrite")
            p.copy_(tensors[f"param.{n}"])
    names = list(tr.params)
    index = {id(p): names[i] for i, p in enumerate(tr.params.values())}
    for group in opt.param_groups:
        # the step count lives on the CPU unless the optimizer is fused/capturable (torch's rule)
        step_dev = None if group.get("fused") or group.get("capturable") else torch.device("cpu")
        for p in group["params"]:
            st = {}
            for k in ("step", "exp_avg", "exp_avg_sq"):
                key = f"opt.{index[id(p)]}.{k}"
                if key in tensors:
                    t = tensors[key]
                    st[k] = t.reshape(()).to(step_dev or p.device) if k == "step" else t.to(p.device)
            if st:
                opt.state[p] = st
    return step


def next_batch(task: ResolvedTask, spec: TaskSpec, cfg: TrainConfig, step: int, pool: Batch | None) -> Batch:
    """Fresh samples of step `step`, or a minibatch of the fixed pool (a pure function of step)."""
    rng = step_rng(cfg.seed, step)
    if pool is None:
        return sample_batch(task, spec, cfg.batch_size, rng)
    idx = torch.from_numpy(rng.integers(0, len(pool), size=min(cfg.batch_size, len(pool))))
    return Batch(pool.x[idx], pool.y[idx], pool.which[idx])


# --------------------------------------------------------------------------------------------
# Several runs in one forward: K method states over one frozen base.


def fold_states(states: list[MethodState], batch: int) -> MethodState:
    """K context-method states (prompt and/or prefix keys/values, no weight overrides) as one
    state over a batch of K*batch sequences, run k owning rows k*batch..(k+1)*batch-1. The
    model's forward already accepts per-sequence prompts and prefixes; gradients flow back to
    each run's own tensors."""
    s0 = states[0]
    if any(s.weights for s in states):
        raise ValueError("fold_states: weight overrides cannot be folded into the batch (use vmap)")
    if any(s.vacant != s0.vacant for s in states):
        raise ValueError("fold_states: the states take different slots")

    def fold(ts: list[Tensor | None]) -> Tensor | None:
        if all(t is None for t in ts):
            return None
        if any(t is None or t.shape != ts[0].shape for t in ts):
            raise ValueError("fold_states: the states have different structures")
        x = torch.stack(ts)  # [K, ...]
        return x.unsqueeze(1).expand(x.shape[0], batch, *x.shape[1:]).reshape(-1, *x.shape[1:])

    def fold_layers(lists):
        if all(ls is None for ls in lists):
            return None
        if any(ls is None or len(ls) != len(lists[0]) for ls in lists):
            raise ValueError("fold_states: the states have different structures")
        return [fold([ls[i] for ls in lists]) for i in range(len(lists[0]))]

    return MethodState(prompt=fold([s.prompt for s in states]),
                       prefix_k=fold_layers([s.prefix_k for s in states]),
                       prefix_v=fold_layers([s.prefix_v for s in states]), vacant=s0.vacant)


def runs_logits(model: ToyTransformer, tokens: Tensor, states: list[MethodState], last: int | None = None) -> Tensor:
    """Logits of K runs in one forward: tokens [K, batch, T], one state per run ->
    [K, batch, slots + T (or last), vocab]. Context methods fold into the batch (`fold_states`);
    weight overrides (LoRA) go through torch.func.vmap over the unchanged forward."""
    K, B, T = tokens.shape
    if not any(s.weights for s in states):
        logits = model(tokens.reshape(K * B, T), fold_states(states, B), last=last)
        return logits.view(K, B, *logits.shape[1:])
    names = list(states[0].weights)
    if any(list(s.weights) != names for s in states):
        raise ValueError("runs_logits: the states override different weights")
    weights = {n: torch.stack([s.weights[n] for s in states]) for n in names}
    vacant = states[0].vacant

    n_layers = model.cfg.n_layers

    def layers(get) -> dict[int, Tensor]:  # the prefixed layers, stacked along the run axis
        if get(states[0]) is None:
            return {}
        return {i: torch.stack([get(s)[i] for s in states]) for i, t in enumerate(get(states[0])) if t is not None}

    prompt = None if states[0].prompt is None else torch.stack([s.prompt for s in states])
    pk, pv = layers(lambda s: s.prefix_k), layers(lambda s: s.prefix_v)

    def one(w, prompt_, pk_, pv_, toks):
        ks = [pk_.get(i) for i in range(n_layers)] if pk_ else None
        vs = [pv_.get(i) for i in range(n_layers)] if pv_ else None
        return model(toks, MethodState(prompt_, ks, vs, w, vacant=vacant), last=last)

    in_dims = (0, None if prompt is None else 0, 0, 0, 0)
    # SDPA has no vmap batching rule on the CPU (a slow per-sample fallback): explicit softmax
    fast, model.fast_attention = model.fast_attention, False
    try:
        return torch.func.vmap(one, in_dims=in_dims)(weights, prompt, pk, pv, tokens)
    finally:
        model.fast_attention = fast


def _group_losses(model: ToyTransformer, trs: list[Trainable], batches: list[Batch]) -> Tensor:
    """Mean cross-entropy of each run on its own batch: [K]. One run: exactly `loss_on`."""
    if len(trs) == 1:
        return loss_on(model, batches[0], trs[0].to_state()).reshape(1)
    tokens = torch.stack([b.content for b in batches])
    y = torch.stack([b.y for b in batches])  # [K, B, L]
    out = runs_logits(model, tokens, [tr.to_state() for tr in trs], last=y.shape[-1])  # [K, B, L, vocab]
    ce = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), reduction="none")
    return ce.view(len(trs), -1).mean(1)


class _Prefetch:
    """The next step's batches, drawn on a worker thread while this step computes (numpy and
    torch release the GIL in their kernels). Batches are pure functions of (run, step), so
    nothing changes but the time."""

    def __init__(self, make: Callable[[int, int], Batch]):
        self.make = make
        self.pool = ThreadPoolExecutor(1)
        self.pending: dict[int, object] = {}

    def get(self, step: int, runs: list[int], next_runs: list[int]) -> list[Batch]:
        fut = self.pending.pop(step, None)
        ready = fut.result() if fut is not None else {}
        out = [ready[i] if i in ready else self.make(i, step) for i in runs]
        if next_runs:
            self.pending[step + 1] = self.pool.submit(lambda: {i: self.make(i, step + 1) for i in next_runs})
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass(eq=False)
class _Live:
    """Loop-side state of one member."""

    m: Member
    opt: torch.optim.Optimizer
    pool: Batch | None
    test: Batch
    start: int
    seen: int = 0
    loss_ema: float | None = None
    done: bool = False
    result: dict = field(default_factory=dict)


def fit(model: ToyTransformer, tr: Trainable, task: ResolvedTask, spec: TaskSpec, cfg: TrainConfig,
        run: RunDir | None = None, resume: bool = False, progress: Progress | None = None,
        test: Batch | None = None, amp: bool | None = None) -> dict:
    """Train `tr` on `task`; returns the final metrics. With a run directory, checkpoints the
    train state at every evaluation and logs metrics.jsonl, so --resume can continue.
    Trains on the device of `tr`'s tensors (the model must be there too); amp: bf16 autocast
    of the training forward (default: on CUDA GPUs)."""
    return fit_many(model, [Member(tr, task, cfg, run, resume, test)], spec, progress, amp)[0]


@contextlib.contextmanager
def cpu_deterministic(device: torch.device):
    """Training on the CPU uses torch's deterministic kernels. With 2 threads some backward kernels
    otherwise sum in a different order on every call, so the same run ended in different bits
    each time (a 1-step d=32 run: 4 hashes in 4 tries; benchmarks/bench_threads.py). At 1 thread
    the bits are the same either way, and the cost at 2 threads is within noise
    (docs/benchmarks.md). Accelerators are left alone: there it needs CUBLAS_WORKSPACE_CONFIG and
    can be slow. The caller's setting is restored."""
    if device.type != "cpu" or torch.are_deterministic_algorithms_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def fit_many(model: ToyTransformer, members: list[Member], spec: TaskSpec, progress: Progress | None = None,
             amp: bool | None = None) -> list[dict]:
    """The one loop, for one run or K fused runs over the same frozen model: each step draws
    every run's own batch (`next_batch` with its own seed), runs one forward and one backward
    for all (`runs_logits`), then clips and steps each run's own optimizer. Each run evaluates,
    checkpoints, stops early and finishes on its own, exactly as it would alone. Fused runs
    (K > 1) must not use dropout (train_mode False), whose masks would differ from a run alone."""
    if not members:
        return []
    with cpu_deterministic(_model_device(model)):
        return _fit_many(model, members, spec, progress, amp)


def _fit_many(model: ToyTransformer, members: list[Member], spec: TaskSpec, progress: Progress | None,
              amp: bool | None) -> list[dict]:
    K = len(members)
    train_mode = members[0].cfg.train_mode
    if K > 1:
        if any(m.cfg.train_mode != train_mode for m in members):
            raise ValueError("fused runs must share train_mode")
        if train_mode and model.cfg.dropout > 0:
            raise ValueError("fused runs cannot use dropout (train_mode=True): run them alone")
        sizes = {min(m.cfg.batch_size, m.cfg.train_size or m.cfg.batch_size) for m in members}
        if len(sizes) > 1:  # what next_batch draws: a pool smaller than the batch gives the pool's size
            raise ValueError("fused runs must share the batch size")
    device = _model_device(model)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if _use_amp(device, amp)
                else contextlib.nullcontext())
    live = []
    for m in members:
        opt = _optimizer(m.tr, m.cfg)
        pool = None
        if m.cfg.train_size is not None:  # a finite training set, drawn once (sample-efficiency studies)
            pool = sample_batch(m.task, spec, m.cfg.train_size, step_rng(m.cfg.seed, 0, stream=1))
        test = m.test if m.test is not None else fixed_test_set(m.task, spec, m.cfg.eval_size)
        start = 0
        if m.resume and m.run is not None and m.run.resumable:
            start = _load_train_state(m.run, m.tr, opt)
            m.run.truncate_metrics(start)
        live.append(_Live(m, opt, pool, test, start))
    total = max(x.m.cfg.steps for x in live)

    def active_at(step: int) -> list[_Live]:
        return [x for x in live if not x.done and x.start <= step < x.m.cfg.steps]

    def batch_of(i: int, step: int) -> Batch:
        x = live[i]
        return next_batch(x.m.task, spec, x.m.cfg, step, x.pool)

    def finish(x: _Live, step_count: int) -> None:
        model.eval()
        final = evaluate(model, x.m.tr.to_state(), x.test, greedy=True, provide_first=x.m.task.ambiguous_first)
        model.train(train_mode)
        elapsed = time.perf_counter() - t0
        # timings live apart from the results, which are deterministic (resume equivalence)
        x.result = {**final, "steps": step_count,
                    "timing": {"train_seconds": elapsed, "seqs_per_s": x.seen / max(elapsed, 1e-9),
                               "fused_runs": K}}
        x.done = True

    model.train(train_mode)
    # one run: data are cheap next to its step; K runs: draw step s+1 while step s computes
    prefetch = _Prefetch(batch_of) if K > 1 else None
    t0 = time.perf_counter()
    step = min(x.start for x in live)
    try:
        for x in live:
            if x.start >= x.m.cfg.steps:  # interrupted after its last checkpoint
                finish(x, x.start)
        while step < total:
            act = active_at(step)
            if not act:
                step += 1
                continue
            if prefetch:
                index = {id(x): i for i, x in enumerate(live)}
                batches = prefetch.get(step, [index[id(x)] for x in act],
                                       [index[id(x)] for x in active_at(step + 1)])
            else:
                batches = [next_batch(x.m.task, spec, x.m.cfg, step, x.pool) for x in act]
            batches = [Batch(b.x.to(device), b.y.to(device), b.which.to(device)) for b in batches]
            for x in act:
                for g in x.opt.param_groups:
                    g["lr"] = x.m.cfg.lr_at(step)
            torch.manual_seed(act[0].m.cfg.seed * 1_000_003 + step)  # dropout of this step
            with autocast:
                losses = _group_losses(model, [x.m.tr for x in act], batches)
            for x in act:
                x.opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            for x in act:
                if x.m.cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(list(x.m.tr.params.values()), x.m.cfg.grad_clip)
                x.opt.step()
            done = step + 1
            evals = []
            for x, lv, b in zip(act, losses.tolist(), batches):
                cfg = x.m.cfg
                x.seen += len(b)
                x.loss_ema = lv if x.loss_ema is None else 0.95 * x.loss_ema + 0.05 * lv
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    with torch.no_grad():
                        m = evaluate(model, x.m.tr.to_state(), x.test, greedy=False,
                                     provide_first=x.m.task.ambiguous_first)
                    model.train(train_mode)
                    row = {"step": done, "loss": lv, "lr": cfg.lr_at(step), **m}
                    if x.m.run is not None:
                        x.m.run.append_metrics(row)
                        _save_train_state(x.m.run, done, x.m.tr, x.opt)
                    evals.append(m["exact_acc"])
                    if (cfg.stop_at is not None and m["exact_acc"] >= cfg.stop_at) or done == cfg.steps:
                        finish(x, done)
            if progress:
                ema = [x.loss_ema for x in act]
                info = {"loss": ema[0] if K == 1 else sum(ema) / len(ema)}
                if evals:
                    info.update(acc=evals[0] if K == 1 else sum(evals) / len(evals), eval=True)
                if K > 1:
                    info["runs"] = len(act)
                progress(done, total, info)
            step += 1
        for x in live:  # a run whose last step was never reached (none, unless steps differ)
            if not x.done:
                finish(x, min(step, x.m.cfg.steps))
    finally:
        if prefetch:
            prefetch.close()
    model.eval()
    return [x.result for x in live]
