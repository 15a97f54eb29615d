"""Independent stages in parallel on Ray (`prefixlab reproduce --workers N` / `--ray ADDRESS`).

Each uncached stage is one Ray task, and inside a stage each independent group of runs (a stage's
fused groups, `tuning.fused.plan_groups`, through `engine.groups`) is a task too, so E4's LoRA and
prefix, or E3's short and long runs, train side by side. Ray executes; the order is ours: a
broker actor (`engine.schedule.CoreBroker`) grants the worker slots, the longest chain first, and
a task is submitted only once it holds its slots, so nothing queues in Ray behind short work.
A stage whose groups train elsewhere hands its slot back meanwhile. When the study's threads are
not pinned, a piece that is alone in the queue takes every free slot (torch threads = slots x
cores per worker); pinned (`threads=`, and always on a cluster) every piece gets one slot.

Stages stay cached and resumable exactly as in a sequential study: a task writes the same
out/stages/<name>-<key>/result.json, and a worker killed mid-stage loses nothing, because its
runs resume from their last checkpoint when the stage runs again (Ray retries it, or the next
`reproduce` does). Running pieces write their step, loss and ETA to progress files
(`engine.progress`), which the driver reads for its progress callbacks. On a cluster, `out` must
be a path every node sees.

A cluster started with `ray start --head` may ask for a token (Ray's token authentication,
https://docs.ray.io/en/latest/ray-security/token-auth.html): the driver sends one only under
RAY_AUTH_MODE=token, so a token given the ways Ray documents (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
~/.ray/auth_token) turns that mode on; a cluster without authentication accepts it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from engine.cache import cached, is_cached, run_stage, stage_dir
from engine.groups import group_steps, use_group_runner
from engine.progress import ProgressFile, finished_runs, read_progress
from engine.schedule import TOP, CoreBroker, priorities, read_history, record_history, stage_cost, study_plan
from engine.stage import Stage
from engine.timing import StageClock
from prefixlab_common.errors import UserError
from toy_models.lock import STORAGE_ERRNOS
# Lazy imports: ray, torch and tuning's fused trainer are imported inside the functions that start Ray or
# run a piece on a worker: a serial study never imports Ray, and the driver plans without torch. socket is
# needed only to name a cluster host in an error. No cycle is hidden (see the study contract).

POLL_S = 2.0  # how often the driver reads the running pieces' progress files


class _Broker:
    """`CoreBroker` as an async Ray actor: wait(ticket) returns the slots once they are granted."""

    def __init__(self, slots: int, pinned: bool):
        self.b = CoreBroker(slots, pinned)
        self.events: dict[str, asyncio.Event] = {}

    def _wake(self, granted: list[str]) -> None:
        for t in granted:
            self.events.setdefault(t, asyncio.Event()).set()

    async def request(self, tickets: list, release: list = ()) -> None:
        self._wake(self.b.request(tickets, release))

    async def release(self, tickets: list) -> None:
        self._wake(self.b.release(tickets))

    async def drop(self, owner: str) -> None:
        self._wake(self.b.drop(owner))

    async def wait(self, ticket: str) -> int:
        while ticket not in self.b.grants:
            ev = self.events.setdefault(ticket, asyncio.Event())
            await ev.wait()
            ev.clear()
        return self.b.grants.pop(ticket)


class _GroupRunner:
    """Inside a stage task: its groups of runs as Ray tasks, each once the broker grants it slots
    (the longest group first, at the stage's priority); the stage's own slot is handed back
    meanwhile and taken back, ahead of everything, when its groups are done."""

    def __init__(self, broker, name: str, priority: float, slots: int, slot_threads: int, clock: StageClock,
                 progress_dir: Path):
        self.broker, self.name, self.priority, self.slots = broker, name, priority, slots
        self.slot_threads, self.clock, self.progress_dir = slot_threads, clock, progress_dir

    def __call__(self, base, groups: list[list[dict]], device) -> None:
        import ray
        task = ray.remote(max_retries=2)(_group_task)
        phase, self.clock.phase = self.clock.phase, self.clock.phase + 1  # a later hand-over waits for this one
        t_away = time.perf_counter()
        tickets = {f"{self.name}/g{i}": g for i, g in enumerate(groups)}
        ray.get(self.broker.request.remote([(t, (self.priority, group_steps(g)), None) for t, g in tickets.items()],
                                           [self.name]))
        waits = {self.broker.wait.remote(t): t for t in tickets}
        running: dict = {}
        errors = []
        while waits or running:
            ready, _ = ray.wait(list(waits) + list(running), num_returns=1)
            ref = ready[0]
            if ref in waits:
                t, n = waits.pop(ref), ray.get(ref)
                if not running and not self.clock.groups:  # nothing of the stage computed meanwhile
                    self.clock.waited_s += time.perf_counter() - t_away
                threads = n * self.slot_threads
                running[task.options(num_cpus=n).remote(str(base), tickets[t], threads, device,
                                                        str(self.progress_dir / f"{t.split('/')[1]}.json"))] = (t, threads)
                continue
            t, threads = running.pop(ref)
            try:
                self.clock.groups.append((ray.get(ref), threads, phase))
            except Exception as e:  # past its retries: the stage fails once its other groups are done
                errors.append(getattr(e, "cause", e))
            self.broker.release.remote([t])
        t_back = time.perf_counter()
        ray.get(self.broker.request.remote([(self.name, TOP, self.slots)]))
        ray.get(self.broker.wait.remote(self.name))
        self.clock.waited_s += time.perf_counter() - t_back
        self.clock.away_s += time.perf_counter() - t_away
        if errors:
            raise errors[0]


def _stage_task(out: str, stage: Stage, key: str, slots: int, slot_threads: int, priority: float,
                broker, device, upstream: dict) -> dict:
    import ray
    import torch
    name = stage.name
    ray.get(broker.drop.remote(name))  # what a killed attempt of this stage still held
    threads = slots * slot_threads
    torch.set_num_threads(threads)
    clock = StageClock(threads=threads)
    progress_dir = stage_dir(Path(out), stage, key) / "progress"
    for old in progress_dir.glob("*.json"):  # an earlier attempt's
        old.unlink(missing_ok=True)
    runner = _GroupRunner(broker, name, priority, slots, slot_threads, clock, progress_dir)
    with use_group_runner(runner), ProgressFile(progress_dir / "stage.json", threads) as prog:
        return run_stage(Path(out), stage, key, upstream, prog, device, clock)


def _group_task(base: str, jobs: list[dict], threads: int, device, progress: str) -> float:
    """One group of a stage's runs, trained in a task of its own; returns its seconds."""
    import torch
    from tuning.fused import finetune_many
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with ProgressFile(Path(progress), threads) as prog:
        finetune_many(base, jobs, prog, device)
    return time.perf_counter() - t0


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
            _init_local(ray, workers)
    except Exception as e:  # ConnectionError, or a malformed address (ValueError, RuntimeError)
        ray.shutdown()
        raise UserError(_connect_error(address, e)) from None
    return ray, True


def _init_local(ray, workers: int) -> None:
    """A quiet local Ray for this study alone: no token authentication (nothing outside this machine
    connects to it, so Ray's token set-up and its warning lines are noise) and no start-up log lines.
    RAY_AUTH_MODE given by the user is kept; ours is dropped again once Ray has started."""
    ours = "RAY_AUTH_MODE" not in os.environ
    if ours:
        os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    finally:
        if ours:
            os.environ.pop("RAY_AUTH_MODE", None)


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


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one): what
    `--workers auto` starts one worker per."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def default_threads(workers: int, ray_address: str | None) -> int:
    """Torch threads per task: the local cores divided among the workers; 1 on a cluster, whose
    nodes' cores Ray counts, not this machine's."""
    return 1 if (ray_address or os.environ.get("RAY_ADDRESS")) else _threads(workers)


def announce(progress_factory, out: Path, stages: list[Stage], keys: dict[str, str], workers: int,
             history: dict | None = None) -> None:
    """Tell a progress factory that has a `plan` method the study's plan (`engine.schedule.study_plan`)."""
    plan = getattr(progress_factory, "plan", None)
    if plan is not None:
        hist = read_history(out) if history is None else history
        done = {s.name for s in stages if is_cached(out, s, keys[s.name])}
        plan(study_plan(stages, keys, hist, {s.name: stage_dir(out, s, keys[s.name]) for s in stages}, done), workers)


def _slots(ray, workers: int, ray_address: str | None) -> int:
    if ray_address or os.environ.get("RAY_ADDRESS"):
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return workers


def run_parallel(out: Path, stages: list[Stage], keys: dict[str, str], only, workers: int,
                 ray_address: str | None, on_done=None, threads: int | None = None, device=None,
                 on_note=None, progress_factory=None, pinned: bool = True) -> dict:
    """Run every uncached stage on Ray (module docstring). threads: torch threads per worker slot;
    pinned: every piece gets one slot (else a piece alone in the queue takes every free slot).
    progress_factory(i, n, stage) -> callback(step, total, info), called as a stage starts; its
    callback hears the stage's progress files every POLL_S seconds."""
    if threads is None:
        threads = default_threads(workers, ray_address)
    ray, started = _init_ray(workers, ray_address, threads)
    task = ray.remote(max_retries=2)(_stage_task)
    records: dict[str, dict] = {}
    todo = [s for s in stages if not only or s.name in only]
    for stage in list(todo):
        rec = cached(out, stage, keys[stage.name], on_note)
        if rec is not None:
            records[stage.name] = rec
            todo.remove(stage)
    history = read_history(out)
    prio = priorities({s.name: stage_cost(s.name, keys[s.name], s.estimate, history) for s in todo},
                      {s.name: s.needs for s in stages})
    n_total = len(records) + len(todo)
    try:
        slots = _slots(ray, workers, ray_address)
        studied = set(records) | {s.name for s in todo}
        announce(progress_factory, out, [s for s in stages if s.name in studied], keys, slots, history)
        for i, n in enumerate(records):
            if on_done:
                on_done(n, records[n], i + 1, n_total)
        broker = ray.remote(num_cpus=0)(_Broker).remote(slots, pinned or slots == 1)
        _drive(ray, out, stages, todo, keys, records, prio, broker, task, threads, device,
               on_done, progress_factory, n_total)
    except Exception as e:
        if _ray_lost(e):
            raise UserError(_lost_message(e, ray_address)) from None
        raise
    finally:
        if started:
            with contextlib.suppress(Exception):  # a Ray that died under the study may not shut down cleanly
                ray.shutdown()
    return {s.name: records[s.name] for s in stages if s.name in records}


def _drive(ray, out, stages, todo, keys, records, prio, broker, task, slot_threads, device,
           on_done, progress_factory, n_total) -> None:
    """The driver's loop: ask the broker for slots as stages become ready, submit each stage once
    it holds them, collect it, and relay the running stages' progress."""
    by_name = {s.name: s for s in stages}
    asked: set[str] = set()
    waits: dict = {}  # broker.wait ref -> stage name
    running: dict = {}  # stage task ref -> stage name
    progs: dict[str, object] = {}
    release: list[str] = []
    scheduled = {s.name for s in todo}
    while len(asked) < len(todo) or waits or running:
        # upstream stages outside this study (--stage) are not waited for, as in a sequential study
        ready = [s for s in todo if s.name not in asked and all(n in records for n in s.needs if n in scheduled)]
        dead = [s for s in ready if any(records[n].get("died") for n in s.needs if n in records)]
        for s in dead:
            records[s.name] = {"name": s.name, "title": s.title, "status": "failed", "key": keys[s.name],
                               "seconds": 0.0, "cached": False, "error": "an upstream stage's task died"}
            asked.add(s.name)
            if on_done:
                on_done(s.name, records[s.name], len(records), n_total)
        ready = [s for s in ready if s.name not in asked]
        if ready or release:
            ray.get(broker.request.remote([(s.name, prio[s.name], None) for s in ready], release))
            waits.update({broker.wait.remote(s.name): s.name for s in ready})
            asked.update(s.name for s in ready)
            release = []
        if not waits and not running:
            if not ready and not dead and len(asked) < len(todo):
                raise RuntimeError("the stage graph has a cycle")  # stages_for orders them: cannot happen
            continue
        done, _ = ray.wait(list(waits) + list(running), num_returns=1, timeout=POLL_S)
        for ref in done:
            if ref in waits:
                name, n = waits.pop(ref), ray.get(ref)
                stage = by_name[name]
                if progress_factory:
                    progs[name] = progress_factory(list(by_name).index(name), len(stages), stage)
                up = {u: records[u] for u in stage.needs if u in records}
                running[task.options(num_cpus=n).remote(str(out), stage, keys[name], n, slot_threads,
                                                        prio[name], broker, device, up)] = name
                continue
            name = running.pop(ref)
            records[name] = _collect(ray, ref, name, keys[name])
            ray.get(broker.drop.remote(name))  # what a task that died in its groups still held
            release.append(name)
            if records[name].get("timing"):
                record_history(out, name, keys[name], by_name[name].estimate, records[name]["timing"],
                               finished_runs(stage_dir(out, by_name[name], keys[name])))
            if on_done:
                on_done(name, records[name], len(records), n_total)
        for name in running.values():
            if progs.get(name):
                state = read_progress(stage_dir(out, by_name[name], keys[name]) / "progress")
                if state:
                    progs[name](state["step"], state["total"], state["info"])


def _collect(ray, ref, name: str, key: str) -> dict:
    try:
        return ray.get(ref)
    except Exception as e:  # the task died past its retries (or its upstream did)
        cause = getattr(e, "cause", e)  # a RayTaskError carries the task's own exception
        if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
            raise OSError(cause.errno, cause.strerror, cause.filename) from None  # a full disk stops the study
        return {"name": name, "status": "failed", "key": key, "seconds": 0.0, "cached": False, "died": True,
                "error": f"{e.__class__.__name__}: {e}".splitlines()[0][:300]}



# Ray's errors for a Ray that is gone (its processes stopped or killed: `ray stop`, a crash, a node
# lost), as opposed to one stage's task failing, which `_collect` records as that stage's failure
RAY_LOST = ("ActorDiedError", "ActorUnavailableError", "RaySystemError", "WorkerCrashedError", "NodeDiedError",
            "LocalRayletDiedError", "RayActorError")


def _ray_lost(e: BaseException) -> bool:
    """Is `e` Ray itself going away under the study (not a stage's own error)?"""
    return any(c.__name__ in RAY_LOST and c.__module__.startswith("ray") for c in type(e).__mro__)


def _lost_message(e: BaseException, ray_address: str | None) -> str:
    where = f"the Ray cluster at {ray_address}" if ray_address else "the local Ray instance"
    return (f"{where} stopped under the study ({e.__class__.__name__}); the stages and runs it finished are "
            "kept: run the same command again to resume")
