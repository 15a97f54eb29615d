"""One generic training loop, used by pretraining and by every tuning method.

nothing here knows which method is trained: a method is a set of trainable tensors and a function
that turns them into a `MethodState` for the frozen model's forward (minGPT's "generic trainer").

Determinism: the data of step s come from `step_rng(seed, s)` and dropout is reseeded per step,
and the learning rate is a pure function of the step. So a run resumed from a checkpoint sees
exactly what an uninterrupted run would, and ends with the same metrics.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from toy_models.errors import UserError
from toy_models.model import MethodState, ToyTransformer
from toy_models.runs import RunDir, load_tensors, save_tensors
from toy_models.tasks import Batch, ResolvedTask, TaskSpec, sample_batch, step_rng, fixed_test_set


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    schedule: str = "cosine"  # "cosine" (after warmup, to min_lr_frac * lr) or "constant"
    warmup: int = 100
    min_lr_frac: float = 0.1
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
        if self.schedule not in ("cosine", "constant"):
            raise UserError(f"unknown schedule {self.schedule!r}; use cosine or constant")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------------------------
# Loss and metrics.


def output_logits(model: ToyTransformer, batch: Batch, state: MethodState | None) -> torch.Tensor:
    """Logits that predict Y: [batch, L, vocab] (from the last X position on)."""
    L = batch.x.shape[1]
    logits = model.content_logits(batch.content, state)
    return logits[:, L - 1:]


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
    provide_first: y1 is given and only y2..yL are scored, as [P] did for mix4, whose y1 cannot
    be known (the task has no indicator; y1 is what reveals it)."""
    was_training = model.training
    model.eval()
    s = 1 if provide_first else 0
    exact, tf_tok, greedy_tok = [], [], []
    try:
        for i in range(0, len(batch), chunk):
            b = Batch(batch.x[i:i + chunk], batch.y[i:i + chunk], batch.which[i:i + chunk])
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

Progress = Callable[[int, int, dict], None]  # (step, total, info) -> None


@dataclass
class Trainable:
    """What the loop trains: named leaf tensors and how they become a MethodState."""

    params: dict[str, torch.nn.Parameter]
    to_state: Callable[[], MethodState]
    no_decay: Callable[[str, torch.Tensor], bool] = lambda name, p: p.ndim < 2


def _optimizer(tr: Trainable, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in tr.params.items() if not tr.no_decay(n, p)]
    no_decay = [p for n, p in tr.params.items() if tr.no_decay(n, p)]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _save_train_state(run: RunDir, step: int, tr: Trainable, opt: torch.optim.Optimizer) -> None:
    tensors = {f"param.{n}": p for n, p in tr.params.items()}
    names = list(tr.params)
    index = {id(p): names[i] for i, p in enumerate(tr.params.values())}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                tensors[f"opt.{index[id(p)]}.{k}"] = v if v.ndim else v.reshape(1)
    save_tensors(run.path / "train_state.safetensors", tensors)
    run.write_json("train_state.json", {"step": step})


def _load_train_state(run: RunDir, tr: Trainable, opt: torch.optim.Optimizer) -> int:
    step = run.read_json("train_state.json")["step"]
    tensors = load_tensors(run.path / "train_state.safetensors")
    with torch.no_grad():
        for n, p in tr.params.items():
            if f"param.{n}" not in tensors or tensors[f"param.{n}"].shape != p.shape:
                raise UserError(f"train state in {run.path} does not match this run; use --overwrite")
            p.copy_(tensors[f"param.{n}"])
    names = list(tr.params)
    index = {id(p): names[i] for i, p in enumerate(tr.params.values())}
    for group in opt.param_groups:
        for p in group["params"]:
            st = {}
            for k in ("step", "exp_avg", "exp_avg_sq"):
                key = f"opt.{index[id(p)]}.{k}"
                if key in tensors:
                    st[k] = tensors[key].reshape(()) if k == "step" else tensors[key]
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


def fit(model: ToyTransformer, tr: Trainable, task: ResolvedTask, spec: TaskSpec, cfg: TrainConfig,
        run: RunDir | None = None, resume: bool = False, progress: Progress | None = None,
        test: Batch | None = None) -> dict:
    """Train `tr` on `task`; returns the final metrics. With a run directory, checkpoints the
    train state at every evaluation and logs metrics.jsonl, so --resume can continue."""
    opt = _optimizer(tr, cfg)
    pf = task.ambiguous_first
    pool = None
    if cfg.train_size is not None:  # a finite training set, drawn once (sample-efficiency studies)
        pool = sample_batch(task, spec, cfg.train_size, step_rng(cfg.seed, 0, stream=1))
    test = test if test is not None else fixed_test_set(task, spec, cfg.eval_size)
    start = 0
    if resume and run is not None and run.resumable:
        start = _load_train_state(run, tr, opt)
        run.truncate_metrics(start)
    model.train(cfg.train_mode)
    t0 = time.perf_counter()
    seen = 0
    last: dict = {}
    step = start
    loss_ema = None
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        batch = next_batch(task, spec, cfg, step, pool)
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout of this step
        loss = loss_on(model, batch, tr.to_state())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(tr.params.values()), cfg.grad_clip)
        opt.step()
        seen += len(batch)
        lv = loss.item()
        loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            with torch.no_grad():
                m = evaluate(model, tr.to_state(), test, greedy=False, provide_first=pf)
            model.train(cfg.train_mode)
            last = {"step": done, "loss": lv, "lr": cfg.lr_at(step), **m}
            if run is not None:
                run.append_metrics(last)
                _save_train_state(run, done, tr, opt)
            if progress:
                progress(done, cfg.steps, {"loss": loss_ema, "acc": m["exact_acc"], "eval": True})
            if cfg.stop_at is not None and m["exact_acc"] >= cfg.stop_at:
                break
        elif progress:
            progress(done, cfg.steps, {"loss": loss_ema})
    model.eval()
    final = evaluate(model, tr.to_state(), test, greedy=True, provide_first=pf)
    elapsed = time.perf_counter() - t0
    # timings live apart from the results, which are deterministic (resume equivalence)
    return {**final, "steps": step + 1,
            "timing": {"train_seconds": elapsed, "seqs_per_s": seen / max(elapsed, 1e-9)}}
