"""Several runs in one forward (fused runs): K method states over one frozen base model, each run
with its own trainable tensors, task, config (seed, lr, schedule, ...), data stream, optimizer,
clipping, evaluation, checkpoints and run directory. Only the forward and backward are shared.

`fit_many` is `toy_models.training.fit` for K runs at once: each step draws every run's own batch,
runs one forward and one backward for all (`runs_logits`), then clips and steps each run's own
optimizer; each run evaluates, checkpoints, stops early (on its accuracy or on a validation
plateau) and finishes on its own: a run that stops leaves the group, the others go on. A run trained
here ends with what `fit` gives it alone (bit for bit for one run in fp32; within fp32 rounding in
a group: tests/toy_models/test_training.py, tests/tuning/test_fused.py).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from prefixlab_common.progress import Progress
from toy_models.model import MethodState, ToyTransformer
from toy_models.runs import RunDir
from toy_models.tasks import Batch, ResolvedTask, TaskSpec, fixed_test_set
from toy_models.training import (Plateau, Trainable, TrainConfig, cpu_deterministic, evaluate, final_metrics,
                                 forward_precision, loss_on, make_optimizer, model_device, next_batch, reseed_dropout,
                                 resume_point, save_train_state, set_lr, training_pool)


@dataclass
class Member:
    """One run of a fused group: what `fit` takes for one run."""

    tr: Trainable
    task: ResolvedTask
    cfg: TrainConfig
    run: RunDir | None = None
    resume: bool = False
    test: Batch | None = None


# --------------------------------------------------------------------------------------------
# K method states in one forward.


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


def group_losses(model: ToyTransformer, trs: list[Trainable], batches: list[Batch]) -> Tensor:
    """Mean cross-entropy of each run on its own batch: [K]. One run: exactly `loss_on`."""
    if len(trs) == 1:
        return loss_on(model, batches[0], trs[0].to_state()).reshape(1)
    tokens = torch.stack([b.content for b in batches])
    y = torch.stack([b.y for b in batches])  # [K, B, L]
    out = runs_logits(model, tokens, [tr.to_state() for tr in trs], last=y.shape[-1])  # [K, B, L, vocab]
    ce = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), reduction="none")
    return ce.view(len(trs), -1).mean(1)


# --------------------------------------------------------------------------------------------
# The loop of K runs.


class Prefetch:
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


class LiveRun:
    """Loop-side state of one member: its optimizer, data, test set, start step and result."""

    def __init__(self, m: Member, spec: TaskSpec):
        self.m, self.cfg, self.spec = m, m.cfg, spec
        self.opt = make_optimizer(m.tr, m.cfg)
        self.pool = training_pool(m.task, spec, m.cfg)
        self.test = m.test if m.test is not None else fixed_test_set(m.task, spec, m.cfg.eval_size)
        self.plateau = Plateau.of(m.cfg, m.task, spec, m.tr)
        self.start = resume_point(m.run, m.resume, m.tr, self.opt, self.plateau)
        self.seen, self.loss_ema, self.result = 0, None, None

    def active(self, step: int) -> bool:
        return self.result is None and self.start <= step < self.cfg.steps

    @property
    def done(self) -> bool:
        """Trained to its last step or stopped on a plateau (a resumed run may be either)."""
        return self.start >= self.cfg.steps or (self.plateau is not None and self.plateau.stopped)

    def batch(self, step: int) -> Batch:
        return next_batch(self.m.task, self.spec, self.cfg, step, self.pool)

    def after_step(self, model: ToyTransformer, step: int, loss: float, n: int, t0: float, K: int) -> float | None:
        """Book one step (`step` done); evaluate, checkpoint and maybe finish on this run's
        schedule. Returns the evaluation's exact accuracy, None without one."""
        cfg, m = self.cfg, self.m
        self.seen += n
        self.loss_ema = loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * loss
        if not (step % cfg.eval_every == 0 or step == cfg.steps):
            return None
        metrics = evaluate(model, m.tr.to_state(), self.test, greedy=False, provide_first=m.task.ambiguous_first)
        if self.plateau is not None:
            metrics["val_loss"] = self.plateau.update(model, m.tr, step)
        if m.run is not None:
            m.run.append_metrics({"step": step, "loss": loss, "lr": cfg.lr_at(step - 1), **metrics})
            save_train_state(m.run, step, m.tr, self.opt, self.plateau)
        stopped = self.plateau is not None and self.plateau.stopped
        if (cfg.stop_at is not None and metrics["exact_acc"] >= cfg.stop_at) or step == cfg.steps or stopped:
            self.finish(model, step, t0, K)
        return metrics["exact_acc"]

    def finish(self, model: ToyTransformer, steps: int, t0: float, K: int) -> None:
        self.result = final_metrics(model, self.m.tr, self.m.task, self.test, steps, self.seen, t0, fused_runs=K,
                                    plateau=self.plateau)


def fit_many(model: ToyTransformer, members: list[Member], spec: TaskSpec, progress: Progress | None = None,
             precision: str = "fp32") -> list[dict]:
    """`fit` for K runs over the same frozen model, in one forward and one backward a step.
    Fused runs (K > 1) must not use dropout (train_mode False), whose masks would differ from a
    run alone, and must share the batch size. precision: "fp32" or "bf16" (autocast), all runs'."""
    if not members:
        return []
    check_fusable(model, members)
    with cpu_deterministic(model_device(model)):
        live = [LiveRun(m, spec) for m in members]
        try:
            _train(model, live, progress, precision)
        finally:
            model.eval()
    return [x.result for x in live]


def check_fusable(model: ToyTransformer, members: list[Member]) -> None:
    if len(members) == 1:
        return
    train_mode = members[0].cfg.train_mode
    if any(m.cfg.train_mode != train_mode for m in members):
        raise ValueError("fused runs must share train_mode")
    if train_mode and model.cfg.dropout > 0:
        raise ValueError("fused runs cannot use dropout (train_mode=True): run them alone")
    sizes = {min(m.cfg.batch_size, m.cfg.train_size or m.cfg.batch_size) for m in members}
    if len(sizes) > 1:  # what next_batch draws: a pool smaller than the batch gives the pool's size
        raise ValueError("fused runs must share the batch size")


def _train(model: ToyTransformer, live: list[LiveRun], progress: Progress | None, precision: str) -> None:
    K, device = len(live), model_device(model)
    total = max(x.cfg.steps for x in live)
    model.train(live[0].cfg.train_mode)
    # one run: data are cheap next to its step; K runs: draw step s+1 while step s computes
    prefetch = Prefetch(lambda i, s: live[i].batch(s)) if K > 1 else None
    t0 = time.perf_counter()
    try:
        for x in live:
            if x.done:  # interrupted after its last checkpoint
                x.finish(model, x.start, t0, K)
        for step in range(min(x.start for x in live), total):
            act = [i for i, x in enumerate(live) if x.active(step)]
            if not act:
                continue
            if prefetch:
                batches = prefetch.get(step, act, [i for i, x in enumerate(live) if x.active(step + 1)])
            else:
                batches = [live[i].batch(step) for i in act]
            batches = [b.to(device) for b in batches]
            for i in act:
                set_lr(live[i].opt, live[i].cfg.lr_at(step))
            reseed_dropout(live[act[0]].cfg, step)
            with forward_precision(device, precision):
                losses = group_losses(model, [live[i].m.tr for i in act], batches)
            for i in act:
                live[i].opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            for i in act:
                if live[i].cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(list(live[i].m.tr.params.values()), live[i].cfg.grad_clip)
                live[i].opt.step()
            evals = []
            for i, loss, batch in zip(act, losses.tolist(), batches):
                acc = live[i].after_step(model, step + 1, loss, len(batch), t0, K)
                if acc is not None:
                    evals.append(acc)
            if progress:
                ema = [live[i].loss_ema for i in act]
                info = {"loss": sum(ema) / len(ema)}
                if evals:
                    info.update(acc=sum(evals) / len(evals), eval=True)
                if K > 1:
                    info["runs"] = len(act)
                progress(step + 1, total, info)
        for x in live:  # a run whose last step was never reached (none, unless steps differ)
            if x.result is None:
                x.finish(model, min(total, x.cfg.steps), t0, K)
    finally:
        if prefetch:
            prefetch.close()
