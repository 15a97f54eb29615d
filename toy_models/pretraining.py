"""Pretraining a base run, and loading base runs back (tuned runs: `tuning.load_run`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prefixlab_common.errors import UserError
from toy_models.lock import DirLock
from toy_models.model import MethodState, ToyConfig, ToyTransformer, preset_config
from toy_models.runs import MODEL_FILE, RunDir, load_tensors, provenance, save_tensors, sha256
from toy_models.tasks import TaskSpec, resolve_task, fixed_test_set
from toy_models.precision import resolve_precision
from toy_models.training import Progress, Trainable, TrainConfig, device_info, evaluate, fit, resolve_device

# [P]'s pretraining recipe (AdamW 0.9/0.95, wd 0.1, clip 1, batch 64) with a warmup + cosine
# schedule and a larger peak lr, which reaches the same accuracy in far fewer steps on a CPU.
PRETRAIN_DEFAULTS = dict(steps=3000, lr=3e-3, warmup=100, schedule="cosine", eval_every=250)
# The slot protocol of a new base run (toy_models/model.py); docs/experiments.md has the
# measurements behind the choice.
DEFAULT_SLOTS = "token"


def restart_or_resume(run: RunDir, overwrite: bool, resume: bool) -> tuple[bool, bool]:
    """(resume, overwrite) as a run is begun: an interrupted run with no checkpoint yet (killed or
    out of space before its first evaluation) restarts from step 0 in its own directory."""
    if resume and not run.resumable:
        return False, True
    return resume, overwrite


def build_model(cfg: ToyConfig, seed: int) -> ToyTransformer:
    g = torch.Generator().manual_seed(seed)
    model = ToyTransformer(cfg)
    model.reset_parameters(generator=g)
    return model


def pretrain(out: str | Path, task: str = "mix4", preset: str = "default", spec: TaskSpec | None = None,
             train: TrainConfig | None = None, model_overrides: dict | None = None,
             overwrite: bool = False, resume: bool = False, progress: Progress | None = None,
             slots: str | None = None, device: str | torch.device | None = None,
             lock_wait: float = 0.0, on_note=None, precision: str | None = None) -> dict:
    """Pretrain a base model on `task` and write a run directory. Returns the final metrics.
    The run is complete (metrics.json) only once every file is written; its directory is locked
    meanwhile (`toy_models.lock`: lock_wait seconds for another writer; on_note(line) hears of a
    dead writer's lock taken over).
    slots: the slot protocol, "token" ([P]: SLOT tokens in the prompt slots) or "empty".
    device: None (cpu), "auto", "cpu", "cuda", "mps"; the checkpoint is saved from CPU tensors.
    precision: fp32, bf16 or auto (toy_models/precision.py; None: bf16 on a CUDA GPU that has it,
    fp32 elsewhere)."""
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    run = RunDir(out)
    spec = spec or TaskSpec()
    train = train or TrainConfig(**PRETRAIN_DEFAULTS)
    resolved = resolve_task(task, spec)
    overrides = {"slots": slots or DEFAULT_SLOTS, **(model_overrides or {})}
    cfg = preset_config(preset, d_vocab=spec.vocab_size, n_ctx=spec.n_ctx, n_prompt=spec.prompt_len, **overrides)
    run.check_new(overwrite, resume)  # everything is validated before anything is written
    config = {"kind": "pretrain", "task": task, "preset": preset, "slots": cfg.slots, "model": cfg.to_dict(),
              "task_spec": spec.to_dict(), "train": train.to_dict(), "seed": train.seed}
    if precision != "fp32":  # fp32 runs keep the config they always had
        config["precision"] = precision
    if resume and run.config != config:
        raise UserError(f"the options differ from those of the interrupted run at {run.path}; "
                        "resume with the same options")
    with DirLock(run.path, "pretrain", wait=lock_wait) as lock:
        if lock.note and on_note:
            on_note(lock.note)
        run.check_new(overwrite, resume)  # again, as the one writer: another may have finished it
        resume, overwrite = restart_or_resume(run, overwrite, resume)
        run.prepare(overwrite, resume)
        if not resume:
            run.write_json("config.json", config)
            run.write_json("provenance.json", provenance(train.seed, **device_info(dev, precision)))
        model = build_model(cfg, train.seed).to(dev)  # initialised on the CPU: the same weights anywhere
        params = dict(model.named_parameters())
        tr = Trainable(params, lambda: None,
                       no_decay=lambda n, p: p.ndim < 2 or n.endswith(("W_E", "W_pos")))
        metrics = fit(model, tr, resolved, spec, train, run=run, resume=resume, progress=progress,
                      precision=precision)
        save_tensors(run.path / MODEL_FILE, model.state_dict(), meta={"config": cfg.to_dict()})
        run.finish(metrics, files=(MODEL_FILE,))
    return metrics


# --------------------------------------------------------------------------------------------
# Loading.


@dataclass
class LoadedRun:
    path: Path
    config: dict
    model: ToyTransformer  # the frozen base model
    spec: TaskSpec
    state: MethodState | None  # None for a base run
    method: object | None = None  # the tuning method object, for tuned runs

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def name(self) -> str:
        return self.path.name


def load_model(path: str | Path, device: str | torch.device | None = None) -> tuple[ToyTransformer, dict]:
    """The base model of a base run directory, checked against its config, on `device`
    (default cpu)."""
    dev = resolve_device(device)
    run = RunDir(path)
    config = run.config
    if config.get("kind") != "pretrain":
        raise UserError(f"{run.path} is not a base (pretrain) run")
    if not run.complete:
        raise UserError(f"run {run.path} is not complete; finish it with --resume")
    try:
        cfg = ToyConfig.from_dict(config["model"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{run.path}/config.json has no valid model config ({e})") from None
    tensors = load_tensors(run.path / MODEL_FILE)
    model = ToyTransformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    got = {k: v.shape for k, v in tensors.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:1] or [k for k in expected if expected[k] != got.get(k)][:1]
        raise UserError(f"checkpoint {run.path / MODEL_FILE} does not match its config "
                        f"(first mismatch: {missing[0] if missing else sorted(set(got) - set(expected))[0]})")
    model.load_state_dict(tensors)
    model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config


def load_base_run(path: str | Path, device: str | torch.device | None = None) -> LoadedRun:
    """A base run (state None). Tuned runs load through `tuning.load_run`, which sits above the
    method registry it needs, so this layer never imports the one above it."""
    model, config = load_model(path, device)
    return LoadedRun(RunDir(path).path, config, model, TaskSpec(**config["task_spec"]), None)


def evaluate_run(run: LoadedRun, tasks: list[str], n: int = 1000, seed: int = 1234) -> dict[str, dict]:
    out = {}
    for t in tasks:
        resolved = resolve_task(t, run.spec)
        out[t] = evaluate(run.model, run.state, fixed_test_set(resolved, run.spec, n, seed),
                          provide_first=resolved.ambiguous_first)
    return out


def base_sha(path: str | Path) -> str:
    return sha256(Path(path) / MODEL_FILE)
