"""The training loop, used by pretraining and by every tuning method: `fit` trains one run, a
plain loop (batch, forward, loss, backward, step, evaluate every k, checkpoint, progress).
Several runs trained in one forward (fused runs) are toy_models/batched.py, which reuses this
module's optimizer, checkpoints, data and evaluation, and gives a run the same results.

Nothing here knows which method is trained: a method is a set of trainable tensors and a function
that turns them into a `MethodState` for the frozen model's forward (minGPT's "generic trainer").

Determinism: the data of step s come from `step_rng(seed, s)` and dropout is reseeded per step,
and the learning rate is a pure function of the step. So a run resumed from a checkpoint sees
exactly what an uninterrupted run would, and ends with the same metrics.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from prefixlab_common.errors import UserError
from prefixlab_common.progress import Progress
from toy_models.model import MethodState, ToyTransformer
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
    # early stop on a validation plateau (None: off): at each evaluation the loss on a validation set
    # of val_size inputs of the train split (`validation_set`); the run stops once `patience`
    # evaluations in a row have not lowered it by more than min_delta, and ends on the tensors of
    # its lowest validation loss (`Plateau`)
    patience: int | None = None
    min_delta: float = 0.0
    val_size: int = 1000

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
        if self.patience is not None and self.patience <= 0:
            raise UserError(f"patience must be positive, got {self.patience}")
        if self.min_delta < 0 or self.val_size <= 0:
            raise UserError(f"min-delta must be >= 0 and val-size positive, got {self.min_delta} and {self.val_size}")

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
        if self.patience is None:  # runs without an early stop keep their configs too
            for k in ("patience", "min_delta", "val_size"):
                del d[k]
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


def forward_precision(device: torch.device, precision: str):
    """The context of the training forward: bf16 autocast for precision "bf16", else nothing
    (fp32). `precision` is already resolved (toy_models.precision.resolve_precision), so a
    benchmark may ask for bf16 where the CPU only emulates it."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16' (resolved), got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
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
        dev = model_device(model)
        for i in range(0, len(batch), chunk):
            b = Batch(batch.x[i:i + chunk], batch.y[i:i + chunk], batch.which[i:i + chunk]).to(dev)
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
# What the loop trains, and its state.

# Progress (prefixlab_common.progress): (step, total, info) -> None, imported above


@dataclass
class Trainable:
    """What the loop trains: named leaf tensors and how they become a MethodState."""

    params: dict[str, torch.nn.Parameter]
    to_state: Callable[[], MethodState]
    no_decay: Callable[[str, torch.Tensor], bool] = lambda name, p: p.ndim < 2


def make_optimizer(tr: Trainable, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in tr.params.items() if not tr.no_decay(n, p)]
    no_decay = [p for n, p in tr.params.items() if tr.no_decay(n, p)]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # torch's default implementation (foreach and fused variants measured no faster here:
    # benchmarks/bench_training.py, avenues)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def save_train_state(run: RunDir, step: int, tr: Trainable, opt: torch.optim.Optimizer,
                     plateau: "Plateau | None" = None) -> None:
    """The checkpoint of `step`: tensors, optimizer state and, with an early stop, its state."""
    tensors = {f"param.{n}": p for n, p in tr.params.items()}
    names = list(tr.params)
    index = {id(p): names[i] for i, p in enumerate(tr.params.values())}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                tensors[f"opt.{index[id(p)]}.{k}"] = v if v.ndim else v.reshape(1)
    # the step goes into the tensors' own file as well: a kill between the two writes below then
    # resumes from the step the tensors belong to, not from the step before
    meta = {"step": step}
    if plateau is not None:
        tensors.update({f"best.{n}": t for n, t in plateau.best_params.items()})
        meta["plateau"] = plateau.state()
    save_tensors(run.path / "train_state.safetensors", tensors, meta=meta)  # saved from CPU copies
    run.write_json("train_state.json", {"step": step})


def load_train_state(run: RunDir, tr: Trainable, opt: torch.optim.Optimizer, plateau: "Plateau | None" = None) -> int:
    tensors, meta = load_tensors_meta(run.path / "train_state.safetensors")
    if plateau is not None:
        plateau.load(meta.get("plateau"), {n[5:]: t for n, t in tensors.items() if n.startswith("best.")}, run)
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


def resume_point(run: RunDir | None, resume: bool, tr: Trainable, opt: torch.optim.Optimizer,
                 plateau: "Plateau | None" = None) -> int:
    """The step a run starts from: its checkpoint's (tensors, optimizer and early-stop state
    loaded, later metrics rows dropped) when resuming a run that has one, else 0."""
    if not (resume and run is not None and run.resumable):
        return 0
    start = load_train_state(run, tr, opt, plateau)
    run.truncate_metrics(start)
    return start


def training_pool(task: ResolvedTask, spec: TaskSpec, cfg: TrainConfig) -> Batch | None:
    """The finite training set of cfg.train_size examples, drawn once (sample-efficiency
    studies); None: every step draws fresh samples."""
    if cfg.train_size is None:
        return None
    return sample_batch(task, spec, cfg.train_size, step_rng(cfg.seed, 0, stream=1))


# The validation inputs' stream: of the train split, on a stream no training pool uses (their
# pools and batches come from step_rng); the sample-efficiency study chooses its rates on it too
VAL_SEED = 4321


def validation_set(task: ResolvedTask, spec: TaskSpec, n: int, seed: int = VAL_SEED) -> Batch:
    """n inputs of the *train* split (never the test split) on the validation stream."""
    return sample_batch(task, spec, n, np.random.default_rng([seed, 0x7A1]), split="train")


class Plateau:
    """The early stop of a run with `patience` (TrainConfig): at each evaluation its validation
    loss; `bad` counts the evaluations in a row that did not lower it by more than min_delta below
    the last one that did, and the run stops when it reaches patience. The tensors of the lowest
    validation loss so far are kept (`best_params`) and are what the run ends with."""

    def __init__(self, cfg: TrainConfig, task: ResolvedTask, spec: TaskSpec, tr: Trainable):
        self.patience, self.min_delta = cfg.patience, cfg.min_delta
        self.val = validation_set(task, spec, cfg.val_size).to(next(iter(tr.params.values())).device)
        self.ref = self.best = math.inf  # the loss that last reset the count; the lowest loss
        self.best_step, self.bad = 0, 0
        self.best_params = {n: p.detach().clone() for n, p in tr.params.items()}

    @classmethod
    def of(cls, cfg: TrainConfig, task: ResolvedTask, spec: TaskSpec, tr: Trainable) -> "Plateau | None":
        return None if cfg.patience is None else cls(cfg, task, spec, tr)

    @property
    def stopped(self) -> bool:
        return self.bad >= self.patience

    def update(self, model: ToyTransformer, tr: Trainable, step: int) -> float:
        """Evaluate the validation loss after `step` and record it; returns it."""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            loss = loss_on(model, self.val, tr.to_state()).item()
        model.train(was_training)
        return self.record(loss, step, tr)

    def record(self, loss: float, step: int, tr: Trainable) -> float:
        """Keep the tensors if `loss` is the lowest so far; count the evaluations without progress."""
        if loss < self.best:
            self.best, self.best_step = loss, step
            self.best_params = {n: p.detach().clone() for n, p in tr.params.items()}
        if loss < self.ref - self.min_delta:
            self.ref, self.bad = loss, 0
        else:
            self.bad += 1
        return loss

    def restore(self, tr: Trainable) -> None:
        """Put the kept tensors back into the run's (the run ends on its best evaluation)."""
        with torch.no_grad():
            for n, p in tr.params.items():
                p.copy_(self.best_params[n])

    def state(self) -> dict:
        return {"ref": self.ref, "best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load(self, state: dict | None, tensors: dict[str, torch.Tensor], run: RunDir) -> None:
        if state is None or set(tensors) != set(self.best_params):
            raise UserError(f"train state in {run.path} has no early-stop state for this run; use --overwrite")
        self.ref, self.best, self.best_step, self.bad = state["ref"], state["best"], state["best_step"], state["bad"]
        self.best_params = {n: t.to(self.best_params[n].device) for n, t in tensors.items()}

    def summary(self) -> dict:
        """What the final metrics record: the best evaluation's step and validation loss."""
        return {"best_step": self.best_step, "val_loss": self.best}


def next_batch(task: ResolvedTask, spec: TaskSpec, cfg: TrainConfig, step: int, pool: Batch | None) -> Batch:
    """Fresh samples of step `step`, or a minibatch of the fixed pool (a pure function of step)."""
    rng = step_rng(cfg.seed, step)
    if pool is None:
        return sample_batch(task, spec, cfg.batch_size, rng)
    idx = torch.from_numpy(rng.integers(0, len(pool), size=min(cfg.batch_size, len(pool))))
    return Batch(pool.x[idx], pool.y[idx], pool.which[idx])


def reseed_dropout(cfg: TrainConfig, step: int) -> None:
    """Dropout masks of step `step`: a pure function of the run's seed and the step."""
    torch.manual_seed(cfg.seed * 1_000_003 + step)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


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


def final_metrics(model: ToyTransformer, tr: Trainable, task: ResolvedTask, test: Batch, steps: int,
                  seen: int, t0: float, fused_runs: int = 1, plateau: Plateau | None = None) -> dict:
    """What a run returns when it ends: greedy-decoding accuracy on its test set, the steps it
    trained, and its timing (kept apart from the results, which are deterministic). With an early
    stop, the run's tensors become those of its best evaluation first, whose step and validation
    loss are recorded."""
    if plateau is not None:
        plateau.restore(tr)
    was_training = model.training
    final = evaluate(model, tr.to_state(), test, greedy=True, provide_first=task.ambiguous_first)
    model.train(was_training)
    elapsed = time.perf_counter() - t0
    return {**final, "steps": steps, **(plateau.summary() if plateau is not None else {}),
            "timing": {"train_seconds": elapsed, "seqs_per_s": seen / max(elapsed, 1e-9), "fused_runs": fused_runs}}


# --------------------------------------------------------------------------------------------
# The loop.


def fit(model: ToyTransformer, tr: Trainable, task: ResolvedTask, spec: TaskSpec, cfg: TrainConfig,
        run: RunDir | None = None, resume: bool = False, progress: Progress | None = None,
        test: Batch | None = None, precision: str = "fp32") -> dict:
    """Train `tr` on `task`; returns the final metrics. With a run directory, logs metrics.jsonl
    and checkpoints the train state at every evaluation, so `resume` continues from the last one.
    With cfg.patience, stops on a validation plateau and ends on its best evaluation (`Plateau`).
    Trains on the device of the model (tr's tensors must be there too); precision: "fp32", or
    "bf16" for bf16 autocast of the training forward."""
    device = model_device(model)
    with cpu_deterministic(device):
        opt = make_optimizer(tr, cfg)
        pool = training_pool(task, spec, cfg)
        test = fixed_test_set(task, spec, cfg.eval_size) if test is None else test
        plateau = Plateau.of(cfg, task, spec, tr)
        step = resume_point(run, resume, tr, opt, plateau)
        seen, loss_ema, t0 = 0, None, time.perf_counter()
        model.train(cfg.train_mode)
        while step < cfg.steps and not (plateau and plateau.stopped):
            batch = next_batch(task, spec, cfg, step, pool).to(device)
            lr = cfg.lr_at(step)
            set_lr(opt, lr)
            reseed_dropout(cfg, step)
            with forward_precision(device, precision):
                loss = loss_on(model, batch, tr.to_state())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(tr.params.values()), cfg.grad_clip)
            opt.step()
            step, seen = step + 1, seen + len(batch)
            loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
            info = {"loss": loss_ema}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics = evaluate(model, tr.to_state(), test, greedy=False, provide_first=task.ambiguous_first)
                if plateau is not None:
                    metrics["val_loss"] = plateau.update(model, tr, step)
                if run is not None:
                    run.append_metrics({"step": step, "loss": loss.item(), "lr": lr, **metrics})
                    save_train_state(run, step, tr, opt, plateau)
                info.update(acc=metrics["exact_acc"], eval=True)
            if progress:
                progress(step, cfg.steps, info)
            if cfg.stop_at is not None and info.get("acc", -1.0) >= cfg.stop_at:
                break
        result = final_metrics(model, tr, task, test, step, seen, t0, plateau=plateau)
    model.eval()
    return result
