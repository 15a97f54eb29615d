"""Fused runs: K tuned runs of one method structure over one frozen base, trained in one batched
forward and backward (`toy_models.batched.fit_many`).

Each run keeps everything a run alone has: its task and data stream, seed, learning rate and
schedule, optimizer state, gradient clipping, evaluation, checkpoints (train_state.*) and run
directory, written exactly as `tuning.pipeline.finetune` writes it, so `load_run` and the study
read fused runs unchanged. Only the forward and backward are shared: context methods (prompts,
prefixes) fold into the batch as per-sequence method states; weight overrides (LoRA) stack along
a run axis under torch.func.vmap. A fused run ends with the same metrics as the same run alone,
within fp32 rounding (tests/tuning/test_fused.py).
"""

from __future__ import annotations

import contextlib
import json

import torch

from prefixlab_common.errors import UserError
from toy_models.lock import DirLock
from toy_models.pretraining import load_model
from toy_models.precision import resolve_precision
from toy_models.training import Progress, resolve_device
from tuning.jobs import Job, finish_job, job_action, prepare_job, start_job, train_jobs

JOB_KEYS = ("method", "task", "out", "opts", "train", "seed", "precision")


# Fusing pays where a step is bound by per-op overhead (GPUs). On this project's 2-core CPU a
# batch-64 step of the study's models is already bound by compute: K fused runs are one batch of
# 64*K, which costs as much as K steps or more (docs/benchmarks.md, bench_fused.py and
# bench_ceiling.py: 0.91-1.09x for K <= 4, 0.72-0.82x for K = 8-16). On the CPU a group is
# therefore capped at CPU_MAX_FUSED runs; on an accelerator groups are not capped.
CPU_MAX_FUSED = 4
# A study's runs wait this long for another writer of the same run: the orphaned task of a Ray
# worker that died, still running until Ray reaps it (a user's two commands fail at once instead).
LOCK_WAIT = 120.0


def finetune_many(base, jobs: list[dict], progress: Progress | None = None, device=None,
                  overwrite: bool = False, fuse: bool = True, max_fused: int | None = None,
                  lock_wait: float = LOCK_WAIT, on_note=None,
                  precision: str | None = None) -> list[dict]:
    """Tune several runs over one base run. Each job is dict(method, task, out, opts, train,
    seed) with the meaning of `tuning.pipeline.finetune(base, method, task, out, opts, train)`
    (seed overrides train["seed"]), and optionally precision (fp32, bf16 or auto; default: the
    `precision` argument; toy_models/precision.py). Complete runs with the same config are reused,
    interrupted ones resumed, runs killed before their first checkpoint restarted; jobs that
    differ only in task, seed and optimizer settings (lr, schedule, warmup, weight decay, clipping) are fused
    into one group, others run alone. Returns each job's final metrics (what finetune returns).
    progress: one callback (step, total, info) per group. overwrite: retrain every job afresh.
    fuse=False trains every job alone; max_fused caps the runs of one group (default: 4 on the
    CPU, none on an accelerator). Runs of different precisions never fuse.
    Each group's run directories are locked while it trains (`toy_models.lock`), waiting up to
    lock_wait seconds for another writer; on_note(line) hears of a dead writer's lock taken over."""
    dev = resolve_device(device)
    if not jobs:
        return []
    model, prepared, results, todo = _prepare(base, jobs, overwrite, resolve_precision(precision, dev), dev)
    groups = fusion_groups(todo, model, fuse, _cap(max_fused, dev))
    model.to(dev)
    for group in groups:
        with contextlib.ExitStack() as locks:
            for _, job, _ in group:
                lock = locks.enter_context(DirLock(job.run.path, "finetune", wait=lock_wait))
                if lock.note and on_note:
                    on_note(lock.note)
            # decided again as the one writer: a task Ray retried may have run it meanwhile
            group = _decide(group, results, overwrite)
            for _, job, resume in group:
                start_job(job, overwrite=not resume, resume=resume, device=dev)
                job.method.to(dev)
            metrics = train_jobs(model, [(job, resume) for _, job, resume in group], progress)
            for (i, job, _), m in zip(group, metrics):
                results[i] = finish_job(job, m)
            for _, job, _ in group:  # free the group's tensors
                job.method.to("cpu")
    return results


def plan_groups(base, jobs: list[dict], device=None, overwrite: bool = False, fuse: bool = True,
                max_fused: int | None = None) -> list[list[int]]:
    """The groups `finetune_many(base, jobs, ...)` would train, as lists of job indices (complete
    runs, which it reuses, are in none). Groups are independent: `finetune_many` on one group's
    jobs trains exactly that group, so a scheduler may run them in parallel (`study.parallel`)
    and then collect every job's metrics with one more `finetune_many` call, which reuses them."""
    if not jobs:
        return []
    dev = resolve_device(device)
    model, _, _, todo = _prepare(base, jobs, overwrite, resolve_precision(None, dev), dev)
    return [[i for i, _, _ in g] for g in fusion_groups(todo, model, fuse, _cap(max_fused, dev))]


def _cap(max_fused: int | None, dev: torch.device) -> int | None:
    if max_fused is not None:
        if max_fused < 1:
            raise UserError(f"max_fused must be at least 1, got {max_fused}")
        return max_fused
    return CPU_MAX_FUSED if dev.type == "cpu" else None


def _prepare(base, jobs: list[dict], overwrite: bool, precision: str, dev: torch.device):
    """Validate and prepare every job; decide for each, before anything is written, whether its
    run is reused (its metrics are in `results`) or trained (`todo`: index, job, resume).
    precision: the jobs' resolved precision unless a job names its own."""
    model, base_config = load_model(base)  # methods are built on the CPU, then moved
    prepared: list[Job] = []
    for i, j in enumerate(jobs):
        unknown = set(j) - set(JOB_KEYS)
        missing = {"method", "task", "out"} - set(j)
        if unknown or missing:
            raise UserError(f"job {i}: {'unknown keys ' + str(sorted(unknown)) if unknown else 'missing ' + str(sorted(missing))}")
        train = dict(j.get("train") or {})
        if j.get("seed") is not None:
            train["seed"] = j["seed"]
        prec = resolve_precision(j["precision"], dev) if j.get("precision") is not None else precision
        prepared.append(prepare_job(model, base_config, base, j["method"], j["task"], j["out"], j.get("opts"), train, prec))
    outs = [job.run.path.resolve() for job in prepared]
    if len(set(outs)) != len(outs):
        dup = next(o for o in outs if outs.count(o) > 1)
        raise UserError(f"two jobs write the same run directory {dup}")
    results: list[dict | None] = [None] * len(prepared)
    todo = _decide([(i, job, False) for i, job in enumerate(prepared)], results, overwrite)
    return model, prepared, results, todo


def _decide(group: list, results: list, overwrite: bool) -> list[tuple[int, Job, bool]]:
    """The jobs (index, job, _) still to train, each with its resume flag; a complete run is
    reused (its metrics go to `results`). Decided once before anything is written, and again
    under each group's lock (a run found complete meanwhile is reused)."""
    todo = []
    for i, job, _ in group:
        action = job_action(job, overwrite)
        if action == "reuse":
            results[i] = job.run.read_json("metrics.json")
        else:
            todo.append((i, job, action == "resume"))
    return todo


def _key(job: Job) -> str | None:
    """Jobs with the same key train fused; None: this job trains alone."""
    c = job.cfg
    # a finite pool smaller than the batch makes smaller batches (next_batch): not stackable
    batch = min(c.batch_size, c.train_size) if c.train_size is not None else c.batch_size
    return json.dumps([job.config["method"], c.steps, batch, c.eval_every, c.eval_size, c.stop_at,
                       c.train_mode, job.precision], sort_keys=True, default=str)


def fusion_groups(todo, model, fuse: bool, max_fused: int | None) -> list[list]:
    groups: dict[str, list] = {}
    alone = []
    for item in todo:
        job = item[1]
        # dropout masks of fused runs would differ from those of the runs alone; a searched
        # method (the hard prompt) has no training step to share
        if not fuse or job.method.searched or (job.cfg.train_mode and model.cfg.dropout > 0):
            alone.append([item])
        else:
            groups.setdefault(_key(job), []).append(item)
    out = []
    cap = max_fused or 10 ** 9
    for g in groups.values():
        out.extend(g[i:i + cap] for i in range(0, len(g), cap))
    return out + alone
