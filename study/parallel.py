"""Independent stages in parallel on Ray (`prefixlab reproduce --workers N` / `--ray ADDRESS`).

Each uncached stage is one Ray task; its upstream stages' tasks are passed as arguments, so Ray
starts it once they are done: the graph is Ray's, not a scheduler of ours. Every task pins its
torch threads (the machine's cores divided among the workers), so 2 workers x 1 thread on 2
cores do not oversubscribe. Stages stay cached and resumable exactly as in a sequential study:
a task writes the same out/stages/<name>-<key>/result.json, and a worker killed mid-stage loses
nothing, because its runs resume from their last checkpoint when the stage runs again (Ray
retries it, or the next `reproduce` does). Inside a stage, independent groups of runs (a stage's
fused groups, `tuning.fused.plan_groups`) are Ray tasks too, so E4's LoRA and prefix, or E3's
short and long runs, train in parallel. On a cluster, `out` must be a path every node sees.

A cluster started with `ray start --head` may ask for a token (Ray's token authentication,
https://docs.ray.io/en/latest/ray-security/token-auth.html): the driver sends one only under
RAY_AUTH_MODE=token, so a token given the ways Ray documents (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
~/.ray/auth_token) turns that mode on; a cluster without authentication accepts it too.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from toy_models.errors import UserError
from toy_models.lock import STORAGE_ERRNOS


def _stage_task(out: str, preset: str, name: str, key: str, threads: int, device, *upstream: dict) -> dict:
    import torch
    from study.experiments import GROUP_RUNNER
    from study.runner import run_stage
    from study.stages import stages_for
    torch.set_num_threads(threads)
    stage = next(s for s in stages_for(preset, Path(out)) if s.name == name)
    token = GROUP_RUNNER.set(_group_runner(threads))
    try:
        return run_stage(Path(out), stage, key, {u["name"]: u for u in upstream}, None, device)
    finally:
        GROUP_RUNNER.reset(token)


def _group_task(base: str, jobs: list[dict], threads: int, device) -> int:
    """One group of a stage's runs (`tuning.fused.plan_groups`), trained in a task of its own."""
    import torch
    from tuning.fused import finetune_many
    torch.set_num_threads(threads)
    finetune_many(base, jobs, None, device)
    return len(jobs)


def _group_runner(threads: int):
    """Inside a stage task: train the stage's independent groups of runs as Ray tasks. The stage
    task waits in ray.get, which hands its CPU back to Ray, so the groups take the free workers
    (and no more: 2 workers never run more than 2 tasks at once)."""
    def run(base, groups: list[list[dict]], device) -> None:
        import ray
        task = ray.remote(num_cpus=1, max_retries=2)(_group_task)
        ray.get([task.remote(str(base), g, threads, device) for g in groups])
    return run


def _init_ray(workers: int, ray_address: str | None, threads: int):
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if address:  # read by Ray as it is imported, so set first
        _token_mode()
        # Ray's core logs each refused try as a warning on stderr; the one line below says it all
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        raise UserError("--workers/--ray need Ray: pip install -c constraints.txt 'ray>=2,<3'") from None
    if ray.is_initialized():
        return ray, False
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        else:
            # workers inherit this environment; a runtime_env would start Ray's agent (slower)
            os.environ["OMP_NUM_THREADS"] = str(threads)
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # ConnectionError, or a malformed address (ValueError, RuntimeError)
        ray.shutdown()
        raise UserError(_connect_error(address, e)) from None
    return ray, True


def _token_mode() -> None:
    """Send Ray's auth token when one is given the documented ways (module docstring)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    if (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or Path("~/.ray/auth_token").expanduser().is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def _connect_error(address: str | None, e: Exception) -> str:
    first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
    if "InvalidAuthToken" in str(e) or "Unauthenticated" in str(e) or _listening(address):
        # Ray's message does not say why; a head that answers and still refuses wants a token
        if os.environ.get("RAY_AUTH_MODE") == "token":
            return (f"the Ray cluster at {address} answers but refused the token given: compare RAY_AUTH_TOKEN "
                    "(or ~/.ray/auth_token) with what `ray get-auth-token` prints on its head node")
        return (f"the Ray cluster at {address} answers but refused this driver, as a head node with token "
                "authentication does: set RAY_AUTH_TOKEN to the token `ray get-auth-token` prints on its head "
                "node (or put it in ~/.ray/auth_token) and rerun; docs.ray.io/en/latest/ray-security/token-auth.html")
    return (f"cannot reach the Ray cluster at {address}: {first} (is `ray start --head` running there, "
            "and is ADDRESS the host:port it printed?)")


def _listening(address: str | None) -> bool:
    """Does something accept connections at host:port (a head node's GCS)?"""
    import socket
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return False
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        return True
    except OSError:
        return False


def _threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def default_threads(workers: int, ray_address: str | None) -> int:
    """Torch threads per task: the local cores divided among the workers; 1 on a cluster, whose
    nodes' cores Ray counts, not this machine's."""
    return 1 if (ray_address or os.environ.get("RAY_ADDRESS")) else _threads(workers)


def run_parallel(out: Path, preset: str, stages: list, keys: dict[str, str], only, workers: int,
                 ray_address: str | None, on_done=None, threads: int | None = None, device=None,
                 on_note=None) -> dict:
    from study.runner import cached
    if threads is None:
        threads = default_threads(workers, ray_address)
    ray, started = _init_ray(workers, ray_address, threads)
    task = ray.remote(num_cpus=1, max_retries=2)(_stage_task)
    records: dict[str, dict] = {}
    refs: dict[str, object] = {}
    try:
        for stage in stages:
            if only and stage.name not in only:
                continue
            rec = cached(out, stage, keys[stage.name], on_note)
            if rec is not None:
                records[stage.name] = rec
                continue
            upstream = [refs.get(n, records.get(n)) for n in stage.needs if n in refs or n in records]
            refs[stage.name] = task.remote(str(out), preset, stage.name, keys[stage.name], threads, device, *upstream)
        names = {ref: n for n, ref in refs.items()}
        pending, n_total = list(refs.values()), len(records) + len(refs)
        for n, rec in records.items():
            if on_done:
                on_done(n, rec, list(records).index(n) + 1, n_total)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            name = names[ready[0]]
            try:
                records[name] = ray.get(ready[0])
            except Exception as e:  # the task died past its retries (or an upstream one did)
                cause = getattr(e, "cause", e)  # a RayTaskError carries the task's own exception
                if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
                    raise OSError(cause.errno, cause.strerror, cause.filename) from None  # a full disk stops the study
                records[name] = {"name": name, "status": "failed", "key": keys[name], "seconds": 0.0, "cached": False,
                                 "error": f"{e.__class__.__name__}: {e}".splitlines()[0][:300]}
            if on_done:
                on_done(name, records[name], n_total - len(pending), n_total)
    finally:
        if started:
            ray.shutdown()
    return {s.name: records[s.name] for s in stages if s.name in records}
