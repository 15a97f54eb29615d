"""Fine-tuning a base run into one tuned run, loading any run back (the run store's entry point:
base runs through toy_models, tuned runs through the method registry), and matching budgets.
The job lifecycle both this and tuning/fused.py use is tuning/jobs.py; sweeps are tuning/sweep.py."""

from __future__ import annotations

from pathlib import Path

import torch

from prefixlab_common.errors import UserError
from toy_models.lock import DirLock
from toy_models.pretraining import LoadedRun, base_sha, load_base_run, load_model, restart_or_resume
from toy_models.runs import METHOD_FILE, RunDir, load_tensors
from toy_models.tasks import TaskSpec
from toy_models.precision import resolve_precision
from toy_models.training import Progress, resolve_device
from tuning.jobs import check_slots, finish_job, prepare_job, start_job, train_jobs
from tuning.registry import make_method, method_class


def finetune(base: str | Path, method: str, task: str, out: str | Path, opts: dict | None = None,
             train: dict | None = None, overwrite: bool = False, resume: bool = False,
             progress: Progress | None = None, slots: str | None = None,
             device: str | torch.device | None = None, lock_wait: float = 0.0,
             on_note=None, precision: str | None = None) -> dict:
    """Tune `method` on `task` over the frozen base run; write a tuned run. Returns final metrics.
    The run directory is locked while it is written (lock_wait, on_note: as `toy_models.pretraining.pretrain`).
    slots: the slot protocol the caller expects of the base; another one is refused.
    device: None (cpu), "auto", "cpu", "cuda", "mps" (recorded in provenance.json).
    precision: fp32, bf16 or auto (toy_models/precision.py; None: bf16 on a CUDA GPU that has it,
    fp32 elsewhere)."""
    dev = resolve_device(device)
    model, base_config = load_model(base)
    check_slots(model, slots, base)
    job = prepare_job(model, base_config, base, method, task, out, opts, train, resolve_precision(precision, dev))
    job.run.check_new(overwrite, resume)
    if resume and job.run.config != job.config:
        raise UserError(f"the options differ from those of the interrupted run at {job.run.path}")
    with DirLock(job.run.path, "finetune", wait=lock_wait) as lock:
        if lock.note and on_note:
            on_note(lock.note)
        job.run.check_new(overwrite, resume)  # again, as the one writer: another may have finished it
        resume, overwrite = restart_or_resume(job.run, overwrite, resume)
        start_job(job, overwrite, resume, dev)
        model.to(dev)
        job.method.to(dev)
        metrics = train_jobs(model, [(job, resume)], progress)[0]
        return finish_job(job, metrics)


def load_run(path: str | Path, device: str | torch.device | None = None) -> LoadedRun:
    """Any run: a base run (state None) or a tuned run (base model + its method state), on
    `device` (default cpu) wherever it was trained."""
    run = RunDir(path)
    kind = run.config.get("kind")
    if kind == "pretrain":
        return load_base_run(path, device)
    if kind == "finetune":
        return load_tuned(run.path, run.config, device)
    raise UserError(f"{run.path}/config.json has unknown run kind {kind!r}")


def load_tuned(path: Path, config: dict, device: str | torch.device | None = None) -> LoadedRun:
    run = RunDir(path)
    if not run.complete:
        raise UserError(f"run {run.path} is not complete; finish it with --resume")
    base = config.get("base", {})
    base_path = Path(base.get("path", ""))
    if not (base_path / "model.safetensors").is_file():
        raise UserError(f"the base run of {run.path} is missing ({base_path})")
    if base_sha(base_path) != base.get("sha256"):
        raise UserError(f"the base checkpoint of {run.path} changed since it was tuned "
                        f"(sha256 mismatch for {base_path / 'model.safetensors'})")
    model, base_config = load_model(base_path)
    check_slots(model, config.get("slots", "empty"), base_path, tuned=run.path)
    spec = TaskSpec(**config["task_spec"])
    if spec.to_dict() != base_config["task_spec"]:
        raise UserError(f"{run.path} was tuned for another task layout than its base run has")
    opts = {k: v for k, v in config["method"].items() if k != "name"}
    m = make_method(config["method"]["name"], model, **opts)
    m.load_export(load_tensors(run.path / METHOD_FILE))
    dev = resolve_device(device)
    model.to(dev)
    m.to(dev)
    m.requires_grad_(False)
    with torch.no_grad():
        state = m.state()
    return LoadedRun(run.path, config, model, spec, state, method=m)


def budget_match(model, target: int, method: str, vary: str | None = None, **opts) -> tuple[int, int]:
    """Pick the value of the method's size option (its `budget_option`: P, or the LoRA rank r)
    whose trainable-parameter count is closest to `target`. Returns (value, count). docs/papers.md §1:
    rank-1 LoRA on attention out + both MLP layers of the 4/4/256 model and a P=12 prefix have
    12,288 parameters each. Each candidate is built (so an invalid size ends the search) and
    counted by the method's declared `param_count`."""
    cls = method_class(method)
    vary = vary or cls.budget_option
    if vary is None:
        raise UserError(f"method {method} has no size option to match a parameter budget with")
    best = None
    for v in range(1, 257):
        try:
            make_method(method, model, **{**opts, vary: v})
        except UserError:
            break
        n = cls.param_count(model, **{**opts, vary: v})
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (v, n)
        if n >= target:
            break
    if best is None:
        raise UserError(f"no {vary} of {method} fits this model")
    return best
