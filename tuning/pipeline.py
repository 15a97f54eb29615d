"""Fine-tuning a base run into a tuned run, loading any run back (the run store's entry point:
base runs through toy_models, tuned runs through the method registry), and matching budgets."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from toy_models.errors import UserError
from toy_models.lock import DirLock
from toy_models.pipeline import LoadedRun, base_sha, load_base_run, load_model, restart_or_resume
from toy_models.runs import METHOD_FILE, RunDir, load_tensors, provenance, save_tensors
from toy_models.tasks import ResolvedTask, TaskSpec, resolve_task
from toy_models.training import Progress, Trainable, TrainConfig, device_info, fit, resolve_device
from tuning import METHODS, make_method
from tuning.base import Method

TUNE_DEFAULTS = dict(steps=1000, warmup=50, schedule="cosine", eval_every=100)


def method_train_config(method: str, overrides: dict) -> TrainConfig:
    """The method's defaults (tuning/*.py `defaults`), then the user's explicit options."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return TrainConfig(**{**TUNE_DEFAULTS, **METHODS[method].defaults,
                          **{k: v for k, v in overrides.items() if v is not None}})


def finetune(base: str | Path, method: str, task: str, out: str | Path, opts: dict | None = None,
             train: dict | None = None, overwrite: bool = False, resume: bool = False,
             progress: Progress | None = None, slots: str | None = None,
             device: str | torch.device | None = None, amp: bool | None = None, lock_wait: float = 0.0,
             on_note=None) -> dict:
    """Tune `method` on `task` over the frozen base run; write a tuned run. Returns final metrics.
    The run directory is locked while it is written (lock_wait, on_note: as `toy_models.pipeline.pretrain`).
    slots: the slot protocol the caller expects of the base; another one is refused.
    device: None (cpu), "auto", "cpu", "cuda", "mps" (recorded in provenance.json).
    amp: bf16 autocast of the training forward (None: on CUDA only)."""
    dev = resolve_device(device)
    model, base_config = load_model(base)
    check_slots(model, slots, base)
    job = prepare_job(model, base_config, base, method, task, out, opts, train)
    job.run.check_new(overwrite, resume)
    if resume and job.run.config != job.config:
        raise UserError(f"the options differ from those of the interrupted run at {job.run.path}")
    with DirLock(job.run.path, "finetune", wait=lock_wait) as lock:
        if lock.note and on_note:
            on_note(lock.note)
        job.run.check_new(overwrite, resume)  # again, as the one writer: another may have finished it
        resume, overwrite = restart_or_resume(job.run, overwrite, resume)
        start_job(job, overwrite, resume, dev, amp)
        model.to(dev)
        job.method.to(dev)
        metrics = fit(model, job.trainable(), job.task, job.spec, job.cfg, run=job.run, resume=resume,
                      progress=progress, amp=amp)
        return finish_job(job, metrics)


@dataclass
class Job:
    """One tuned run, validated and ready to train: its directory, method, config, task."""

    run: RunDir
    method: Method
    cfg: TrainConfig
    task: ResolvedTask
    spec: TaskSpec
    config: dict  # what config.json holds

    def trainable(self) -> Trainable:
        return Trainable(dict(self.method.named_parameters()), self.method.state, self.method.no_decay)


def prepare_job(model, base_config: dict, base, method: str, task: str, out, opts: dict | None,
                train: dict | None) -> Job:
    """Validate a finetune (method options, task, training options) and build its method on
    `model` (on the CPU, so the initialisation is the same on every device). Writes nothing."""
    opts = dict(opts or {})
    cfg = method_train_config(method, train or {})
    spec = TaskSpec(**base_config["task_spec"])
    resolved = resolve_task(task, spec)
    g = torch.Generator().manual_seed(cfg.seed)
    m = make_method(method, model, generator=g, **opts)  # validates P, r, ... before any write
    base_path = Path(base).resolve()
    config = {"kind": "finetune", "task": task, "method": m.config(), "task_spec": spec.to_dict(),
              "train": cfg.to_dict(), "seed": cfg.seed, "n_params": m.n_params,
              "slots": model.cfg.slots,
              "base": {"path": str(base_path), "sha256": base_sha(base_path),
                       "task": base_config["task"], "preset": base_config["preset"]}}
    return Job(RunDir(out), m, cfg, resolved, spec, config)


def start_job(job: Job, overwrite: bool, resume: bool, device: torch.device, amp: bool | None = None) -> None:
    """Create the run directory (config.json, provenance.json) unless resuming."""
    job.run.prepare(overwrite, resume)
    if not resume:
        job.run.write_json("config.json", job.config)
        job.run.write_json("provenance.json", provenance(job.cfg.seed, **device_info(device, amp)))


def finish_job(job: Job, metrics: dict) -> dict:
    metrics["n_params"] = job.method.n_params
    save_tensors(job.run.path / METHOD_FILE, job.method.export(), meta={"method": job.method.config()})
    job.run.finish(metrics, files=(METHOD_FILE,))
    return metrics


def check_slots(model, expected: str | None, base, tuned=None) -> None:
    """A method belongs to the slot protocol of the base it was made for (toy_models/model.py)."""
    if expected is None or expected == model.cfg.slots:
        return
    what = f"{tuned} was tuned for" if tuned else "you asked for"
    raise UserError(f"{what} the '{expected}' slot protocol, but the base run {base} was pretrained "
                    f"with '{model.cfg.slots}' (pretrain a base with --slots {expected})")


def finetune_seeds(base, method, task, out, seeds: list[int], opts=None, train=None, overwrite=False,
                   progress=None, on_seed=None, fuse: bool = True, device=None) -> dict:
    """Repeat a finetune per seed into out/seed{N}; returns per-seed metrics and mean ± std.
    fuse: train the seeds together (`tuning.fused.finetune_many`); False: one after another."""
    if not seeds:
        raise UserError("--seeds needs at least one seed, e.g. --seeds 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds repeats a seed: {seeds}")
    root = RunDir(out)
    root.check_new(overwrite, False)
    with DirLock(root.path, "finetune"):
        root.check_new(overwrite, False)
        return _finetune_seeds(base, method, task, out, seeds, opts, train, overwrite, progress, on_seed, fuse,
                               device, root)


def _finetune_seeds(base, method, task, out, seeds, opts, train, overwrite, progress, on_seed, fuse, device,
                    root: RunDir) -> dict:
    if fuse:
        from tuning.fused import finetune_many
        jobs = [dict(method=method, task=task, out=Path(out) / f"seed{s}", opts=opts, train=train, seed=s)
                for s in seeds]
        results = dict(zip(seeds, finetune_many(base, jobs, progress, device, overwrite=overwrite)))
    else:
        results = {}
        for s in seeds:
            if on_seed:
                on_seed(s)
            results[s] = finetune(base, method, task, Path(out) / f"seed{s}", opts,
                                  {**(train or {}), "seed": s}, overwrite=overwrite, progress=progress,
                                  device=device)
    return seeds_summary(root, method, task, seeds, results)


def seeds_summary(root: RunDir, method: str, task: str, seeds: list[int], results: dict) -> dict:
    accs = [results[s]["exact_acc"] for s in seeds]
    summary = {"method": method, "task": task, "seeds": seeds, "runs": [f"seed{s}" for s in seeds],
               "exact_acc": {str(s): results[s]["exact_acc"] for s in seeds},
               "exact_acc_mean": statistics.fmean(accs),
               "exact_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    root.write_json("summary.json", summary)
    return summary


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
    """Pick the prefix/prompt length P (or the LoRA rank r) whose trainable-parameter count is
    closest to `target`. Returns (value, count). papers.md E4: rank-1 LoRA on attention out +
    both MLP layers of the 4/4/256 model and a P=12 prefix have 12,288 parameters each."""
    vary = vary or ("rank" if method == "lora" else "length")
    best = None
    for v in range(1, 257):
        try:
            n = make_method(method, model, **{**opts, vary: v}).n_params
        except UserError:
            break
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (v, n)
        if n >= target:
            break
    if best is None:
        raise UserError(f"no {vary} of {method} fits this model")
    return best
