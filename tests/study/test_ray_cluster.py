"""`reproduce --ray ADDRESS` against a real head node (`ray start --head`, token authentication
on, as Ray 2.x documents it), with a Ray worker killed in the middle of a stage."""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from study.reproduce import reproduce

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
CLEAN = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
ENV = {**CLEAN, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _stop(pid: int) -> None:
    """Kill the head node we started and every process under it, by pid (`ray stop` would stop
    every Ray instance on the machine, other users' too)."""
    import psutil
    try:
        top = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for p in top.children(recursive=True) + [top]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def head():
    """A head node with 2 CPUs and token authentication (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN)."""
    pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix sockets live under it
    token = secrets.token_hex(32)
    log = Path(tmp) / "head.log"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             f"--port={_free_port()}", "--num-cpus=2", "--include-dashboard=false",
                             f"--temp-dir={tmp}", "--disable-usage-stats"],
                            env={**ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not re.search(r"ray start --address='([^']+)'", log.read_text()):  # printed once it runs
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        printed = re.search(r"ray start --address='([^']+)'", log.read_text()).group(1)
        yield {"address": printed, "port": printed.rsplit(":", 1)[1], "token": token, "pid": proc.pid}
    finally:
        _stop(proc.pid)
        proc.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


def _writer(out: Path, head_pid: int) -> int | None:
    """The pid of a Ray worker of our head node that holds the lock of one of the study's runs
    (`toy_models.lock`: the lock file names its holder), i.e. one in the middle of a stage."""
    import psutil
    workers = {p.pid for p in psutil.Process(head_pid).children(recursive=True)}
    for lock in list(out.glob("stages/*/.*.lock")) + list(out.glob("bases/.*.lock")):
        try:
            pid = json.loads(lock.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            continue  # released, or being written, this instant
        if pid in workers:
            return pid
    return None


@pytest.fixture
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("local") / "study"
    return path, reproduce(path, "micro")  # one torch thread, as each Ray task has


def test_without_the_token_the_error_says_what_to_do(head, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "reproduce", "--scale", "micro", "--stage", "thm2",
                        "--out", str(tmp_path / "s"), "--ray", f"127.0.0.1:{head['port']}"],
                       cwd=ROOT, env={**ENV, "HOME": str(tmp_path)},  # no ~/.ray/auth_token either
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the Ray cluster at 127.0.0.1:") and "RAY_AUTH_TOKEN" in last, r.stderr
    assert "Traceback" not in r.stderr


def test_the_micro_study_through_a_head_node_with_a_worker_killed_mid_stage(head, reference, tmp_path):
    out = tmp_path / "cluster"
    # the address `ray start` printed, and the token the way Ray documents it (RAY_AUTH_MODE left unset)
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "reproduce", "--scale", "micro",
                             "--out", str(out), "--ray", head["address"]],
                            cwd=ROOT, env={**ENV, "RAY_AUTH_TOKEN": head["token"]},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.time() + 400
    while proc.poll() is None and time.time() < deadline and killed is None:
        killed = _writer(out, head["pid"])  # a Ray worker that is writing one of the study's runs
        if killed is not None:
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=max(10, deadline - time.time()))
    assert killed is not None, f"no Ray worker was caught writing a run: {stderr[-2000:]}"
    # the same exit as the local study (0 unless a stage failed there too), the same report
    assert proc.returncode == (1 if any(r["status"] != "done" for r in reference[1]["records"].values()) else 0), stderr
    res = json.loads((out / "report.json").read_text())
    ref = json.loads((reference[0] / "report.json").read_text())
    assert res["table"] == ref["table"]
    strip = lambda s, p: json.loads(json.dumps(s).replace(str(p), "X"))
    assert strip(res["stages"], out) == strip(ref["stages"], reference[0])
