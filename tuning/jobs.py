"""The job lifecycle of a tuned run, below both the single path (tuning/pipeline.py) and the
fused one (tuning/fused.py): validate and build (`prepare_job`), decide reuse/resume/fresh
(`job_action`), create the directory (`start_job`), train (`train_jobs`) and save (`finish_job`)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prefixlab_common.errors import UserError
from toy_models.pretraining import base_sha
from toy_models.runs import METHOD_FILE, RunDir, provenance, save_tensors
from toy_models.tasks import ResolvedTask, TaskSpec, fixed_test_set, resolve_task
from toy_models.batched import Member, fit_many
from toy_models.training import Progress, Trainable, TrainConfig, device_info, evaluate, fit
from tuning.base import Method
from tuning.registry import make_method, method_class

TUNE_DEFAULTS = dict(steps=1000, warmup=50, schedule="cosine", eval_every=100)


def method_train_config(method: str, overrides: dict) -> TrainConfig:
    """The method's defaults (tuning/*.py `defaults`), then the user's explicit options."""
    cls = method_class(method)
    given = {k: v for k, v in overrides.items() if v is not None}
    if cls.train_options is not None:
        extra = sorted(set(given) - set(cls.train_options))
        if extra:
            raise UserError(f"--{extra[0].replace('_', '-')} does not apply to method {method} "
                            f"(it reads only {', '.join('--' + o.replace('_', '-') for o in cls.train_options)})")
    return TrainConfig(**{**TUNE_DEFAULTS, **cls.defaults, **given})


@dataclass
class Job:
    """One tuned run, validated and ready to train: its directory, method, config, task."""

    run: RunDir
    method: Method
    cfg: TrainConfig
    task: ResolvedTask
    spec: TaskSpec
    config: dict  # what config.json holds
    precision: str = "fp32"  # of the training forward (toy_models/precision.py): "fp32" or "bf16"

    def trainable(self) -> Trainable:
        return Trainable(dict(self.method.named_parameters()), self.method.state, self.method.no_decay)


def prepare_job(model, base_config: dict, base, method: str, task: str, out, opts: dict | None,
                train: dict | None, precision: str = "fp32") -> Job:
    """Validate a finetune (method options, task, training options) and build its method on
    `model` (on the CPU, so the initialisation is the same on every device). Writes nothing.
    precision: "fp32" or "bf16", already resolved for the device (config.json names it unless fp32)."""
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
    if precision != "fp32":  # fp32 runs keep the config they always had
        config["precision"] = precision
    return Job(RunDir(out), m, cfg, resolved, spec, config, precision)


def job_action(job: Job, overwrite: bool) -> str:
    """'reuse' a complete run, 'resume' an interrupted one, else 'fresh' (writes afresh)."""
    run = job.run
    if overwrite or not run.path.exists():
        return "fresh"
    if not run.path.is_dir():
        raise UserError(f"{run.path} exists and is not a run directory")
    if not any(run.path.iterdir()):
        return "fresh"
    config = run.read_json("config.json") if (run.path / "config.json").is_file() else None
    if config != job.config:
        what = "a complete run" if run.complete else "another run"
        raise UserError(f"{run.path} holds {what} with other options; pass --overwrite to replace it")
    if run.complete:
        return "reuse"
    return "resume" if run.resumable else "fresh"  # killed before its first checkpoint: restart


def start_job(job: Job, overwrite: bool, resume: bool, device: torch.device) -> None:
    """Create the run directory (config.json, provenance.json) unless resuming."""
    job.run.prepare(overwrite, resume)
    if not resume:
        job.run.write_json("config.json", job.config)
        job.run.write_json("provenance.json", provenance(job.cfg.seed, **device_info(device, job.precision)))


def train_jobs(model, group: list[tuple[Job, bool]], progress: Progress | None = None) -> list[dict]:
    """Train started jobs (each with its resume flag) over `model`: one job through `fit`,
    several fused (`fit_many`); a searched method (the hard prompt) runs its search instead,
    alone. Returns final metrics."""
    if len(group) == 1:
        job, resume = group[0]
        if job.method.searched:
            return [_search(model, job)]
        return [fit(model, job.trainable(), job.task, job.spec, job.cfg, job.run, resume, progress,
                    precision=job.precision)]
    if any(job.method.searched for job, _ in group):
        raise ValueError("a searched method trains alone (tuning/fused.py groups it so)")
    members = [Member(job.trainable(), job.task, job.cfg, job.run, resume) for job, resume in group]
    if len({job.precision for job, _ in group}) > 1:
        raise ValueError("fused runs must share their precision (tuning/fused.py groups them so)")
    return fit_many(model, members, group[0][0].spec, progress, group[0][0].precision)


def _search(model, job: Job) -> dict:
    """A searched method's run: the search, then the evaluation a fit ends with (metrics.jsonl
    gets one row: the search's training loss and the fixed test set's accuracy)."""
    t0 = time.perf_counter()
    model.eval()
    record = job.method.search(model, job.task, job.spec, job.cfg)
    with torch.no_grad():
        state = job.method.state()
        test = fixed_test_set(job.task, job.spec, job.cfg.eval_size)
        row = evaluate(model, state, test, greedy=False, provide_first=job.task.ambiguous_first)
        final = evaluate(model, state, test, greedy=True, provide_first=job.task.ambiguous_first)
    job.run.append_metrics({"step": job.cfg.steps, "loss": record["train_loss"], **row})
    return {**final, "steps": job.cfg.steps, "search": record,
            "timing": {"train_seconds": time.perf_counter() - t0, "fused_runs": 1}}


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


def seeds_summary(root: RunDir, method: str, task: str, seeds: list[int], results: dict) -> dict:
    accs = [results[s]["exact_acc"] for s in seeds]
    summary = {"method": method, "task": task, "seeds": seeds, "runs": [f"seed{s}" for s in seeds],
               "exact_acc": {str(s): results[s]["exact_acc"] for s in seeds},
               "exact_acc_mean": statistics.fmean(accs),
               "exact_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    root.write_json("summary.json", summary)
    return summary
