"""Faults (docs/faults.md): two studies on one directory, a study killed mid-stage, a corrupt
stage record and base, a full disk, a read-only output, Ctrl-C, another thread count. After each,
every run that had completed is still there, byte for byte."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from study.reproduce import _content, reproduce
from prefixlab_common.errors import UserError
from toy_models.runs import RunDir

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MICRO = ["--task", "add1", "--preset", "micro", "--seq-len", "4", "--num-digits", "4", "--prompt-len", "2",
         "--batch-size", "16"]


def lock_path(directory: Path) -> Path:
    """Where `toy_models.lock` keeps a directory's lock (spelled out, so the test runs on old code)."""
    return directory.parent / f".{directory.name}.lock"


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, **kw)


def one_line_error(stderr: str, match: str) -> str:
    """The command ended in one error line, its last, and no traceback (progress lines may precede it)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and match in errors[0], stderr
    assert "Traceback" not in stderr
    return errors[0]


def complete_runs(root: Path) -> dict[str, bytes]:
    """Every file of every complete run (and every stage record) under root, by relative path."""
    files = {}
    for marker in list(root.rglob("metrics.json")) + list(root.rglob("result.json")):
        for f in marker.parent.iterdir():
            if f.is_file():
                files[str(f.relative_to(root))] = f.read_bytes()
    return files


def assert_kept(before: dict[str, bytes], root: Path) -> None:
    for rel, data in before.items():
        assert (root / rel).is_file(), f"{rel} is gone"
        assert (root / rel).read_bytes() == data, f"{rel} changed"


def same_content(a: Path, b: Path) -> None:
    ca, cb = (json.loads((p / "report.json").read_text()) for p in (a, b))
    assert ca["table"] == cb["table"]
    strip = lambda s, p: json.loads(json.dumps(s).replace(str(p), "X"))
    assert strip(ca["stages"], a) == strip(cb["stages"], b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted micro study in this process (one torch thread)."""
    path = tmp_path_factory.mktemp("ref") / "study"
    return path, reproduce(path, "micro")


# -- one writer per directory -----------------------------------------------------------------


def test_second_study_stops_at_once_and_a_killed_ones_lock_is_taken_over(tmp_path, reference):
    out = tmp_path / "study"
    first = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "reproduce", "--scale", "micro", "--out", str(out)],
                             cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("stages/*/result.json")) and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, "the first study should still be running"
        # frozen mid-study (it keeps its lock), so that a fast machine cannot finish it before the
        # kill below and a loaded one cannot make the race go either way
        os.killpg(first.pid, signal.SIGSTOP)
        # 1. a second study on the same directory: one line naming the first, exit 2, at once
        t0 = time.time()
        second = cli("reproduce", "--scale", "micro", "--out", out, "--stage", "thm2")
        assert second.returncode == 2, second.stderr
        line = one_line_error(second.stderr, "in use by another study")
        assert f"pid {first.pid} on host {socket.gethostname()}" in line
        assert time.time() - t0 < 30
        assert not list(out.glob("stages/thm2-*/result.json")) or first.poll() is None, "two writers"
    finally:
        # 2. kill -9 of the first study's driver in the middle of its stages
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert lock_path(out).is_file(), "a killed study leaves its lock file behind"
    kept = complete_runs(out)
    assert kept
    # 3. the next study takes the lock over, says so in one line, and finishes what was left
    res = reproduce(out, "micro")
    assert any(f"pid {first.pid}" in n and "took over the lock" in n for n in res["notes"]), res["notes"]
    assert_kept(kept, out)
    assert not lock_path(out).exists()
    same_content(out, reference[0])
    assert {n: r["status"] for n, r in res["records"].items()} == \
           {n: r["status"] for n, r in reference[1]["records"].items()}


def test_two_pretrains_into_one_run_directory(tmp_path):
    out = tmp_path / "base"
    slow = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "pretrain", *MICRO, "--steps", "100000",
                             "--eval-every", "50", "--out", str(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "train_state.json").is_file() and slow.poll() is None:
            time.sleep(0.05)
        second = cli("pretrain", *MICRO, "--steps", "20", "--eval-every", "10", "--out", out, "--overwrite")
        assert second.returncode == 2, second.stderr
        one_line_error(second.stderr, f"pid {slow.pid}")
        assert slow.poll() is None and (out / "config.json").is_file()  # the first writer is untouched
    finally:
        os.killpg(slow.pid, signal.SIGKILL)
        slow.wait()


# -- a cache that heals ------------------------------------------------------------------------


def test_corrupt_and_incomplete_stage_records_are_set_aside_and_recomputed(tmp_path):
    out = tmp_path / "study"
    only = ["base-E2", "E2", "thm2"]
    first = reproduce(out, "micro", only=only)
    e2 = next(out.glob("stages/E2-*/result.json"))
    thm2 = next(out.glob("stages/thm2-*/result.json"))
    kept = {k: v for k, v in complete_runs(out).items() if out / k not in (e2, thm2)}
    good_e2, good_thm2 = e2.read_bytes(), thm2.read_bytes()
    e2.write_bytes(good_e2[: len(good_e2) // 2])  # truncated
    rec = json.loads(good_thm2)
    del rec["result"]  # valid JSON, but not a whole record
    thm2.write_text(json.dumps(rec))
    broken = {e2: e2.read_bytes(), thm2: thm2.read_bytes()}
    res = reproduce(out, "micro", only=only)
    assert [n for n in res["notes"] if "set aside" in n and n.startswith("stage E2")], res["notes"]
    assert [n for n in res["notes"] if "set aside" in n and n.startswith("stage thm2")], res["notes"]
    for path, data in broken.items():  # set aside, not deleted
        aside = list(path.parent.glob("result.json.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == data
    assert not res["records"]["E2"]["cached"] and not res["records"]["thm2"]["cached"]
    assert res["records"]["base-E2"]["cached"]
    untimed = lambda b: _content(json.loads(b))  # what the report says: no timings
    assert untimed(e2.read_bytes()) == untimed(good_e2)  # recomputed (from its complete runs), the same
    assert untimed(thm2.read_bytes()) == untimed(good_thm2)
    assert_kept(kept, out)
    assert res["table"] == first["table"]


def test_a_corrupt_base_is_set_aside_and_rebuilt_but_a_users_run_is_never_altered(tmp_path):
    out = tmp_path / "study"
    reproduce(out, "micro", only=["base-E2"])
    base = next(out.glob("bases/*/model.safetensors"))
    good = base.read_bytes()
    base.write_bytes(good[: len(good) // 2])
    truncated = base.read_bytes()
    # a user's own run directory on the command line is refused, one line, and left as it is
    r = CliRunner().invoke(app, ["finetune", str(base.parent), "--method", "prefix", "-P", "1", "--task", "add1",
                                 "--out", str(tmp_path / "tuned"), "--steps", "4"])
    assert r.exit_code == 2 and "corrupt" in r.output and "Traceback" not in r.output, r.output
    assert base.read_bytes() == truncated and not (tmp_path / "tuned").exists()
    # the study's own cached base: checked against its SHA-256, set aside, pretrained again
    res = reproduce(out, "micro", only=["base-E2", "E2"])
    assert res["records"]["E2"]["status"] == "done", res["records"]["E2"].get("error")
    assert res["records"]["base-E2"]["status"] == "done" and not res["records"]["base-E2"]["cached"]
    assert base.read_bytes() == good  # rebuilt, bit for bit (one thread, deterministic kernels)
    aside = list(base.parent.parent.glob(f"{base.parent.name}.corrupt-*"))
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == truncated
    assert [n for n in res["notes"] if "does not match its recorded SHA-256" in n], res["notes"]


# -- atomic runs: a full disk, a read-only output, Ctrl-C ------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A small real file system (tmpfs), where this machine lets the tests mount one (root)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the patched-writer tests cover this")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _pretrain_args(out, steps=40, every=10):
    return ["pretrain", *MICRO, "--steps", str(steps), "--eval-every", str(every), "--out", str(out)]


def test_disk_full_on_the_model_file_leaves_an_incomplete_run_that_resume_finishes(tmp_path, monkeypatch):
    """A full disk: `pretrain` runs out of space as it writes model.safetensors (patched writer)."""
    done = tmp_path / "done"
    assert CliRunner().invoke(app, _pretrain_args(done)).exit_code == 0
    kept = complete_runs(tmp_path)
    import toy_models.runs as runs
    real = runs.save_file

    def full(tensors, path, metadata=None):
        if "model.safetensors" in os.path.basename(path):
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # part of the file got out before the disk filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(runs, "save_file", full)
    out = tmp_path / "new"
    r = CliRunner().invoke(app, _pretrain_args(out))
    assert r.exit_code == 2, r.output
    line = one_line_error(r.output, "no space left")
    assert str(out / "model.safetensors") in line
    run = RunDir(out)
    assert not run.complete and run.started and not (out / "model.safetensors").exists()
    assert not list(out.glob(".*.tmp")) and not lock_path(out).exists()
    assert_kept(kept, tmp_path)
    monkeypatch.setattr(runs, "save_file", real)
    r = CliRunner().invoke(app, _pretrain_args(out) + ["--resume"])
    assert r.exit_code == 0, r.output
    assert run.complete and run.verify() == []
    assert (out / "model.safetensors").read_bytes() == (done / "model.safetensors").read_bytes()
    assert_kept(kept, tmp_path)


def test_disk_full_before_the_first_checkpoint_resumes_from_the_start(tmp_path, monkeypatch):
    import toy_models.runs as runs
    real = runs.save_file

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(runs, "save_file", full)
    out = tmp_path / "new"
    r = CliRunner().invoke(app, _pretrain_args(out))
    assert r.exit_code == 2, r.output
    one_line_error(r.output, "no space left")
    assert RunDir(out).started and not (out / "train_state.json").exists()
    monkeypatch.setattr(runs, "save_file", real)
    r = CliRunner().invoke(app, _pretrain_args(out) + ["--resume"])
    assert r.exit_code == 0, r.output
    assert RunDir(out).complete


def test_a_really_full_file_system(tmpfs, tmp_path):
    """A 4 MB tmpfs, mostly filled: pretrain fails on the way, one line; with room again, --resume
    finishes it; the complete run already there keeps its bytes."""
    done = tmpfs / "done"
    assert CliRunner().invoke(app, _pretrain_args(done)).exit_code == 0
    kept = complete_runs(tmpfs)
    free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
    (tmpfs / "filler").write_bytes(b"\0" * (free - 24 * 1024))  # room for a config, not for a checkpoint
    out = tmpfs / "new"
    r = cli(*_pretrain_args(out, steps=200, every=50))
    assert r.returncode == 2, r.stderr
    one_line_error(r.stderr, "no space left")
    assert not RunDir(out).complete
    assert_kept(kept, tmpfs)
    (tmpfs / "filler").unlink()
    r = cli(*_pretrain_args(out, steps=200, every=50), "--resume")
    assert r.returncode == 0, r.stderr
    assert RunDir(out).complete and RunDir(out).verify() == []
    assert_kept(kept, tmpfs)


def test_a_study_on_a_full_disk_stops_with_one_line(tmp_path, monkeypatch):
    out = tmp_path / "study"
    reproduce(out, "micro", only=["thm2"])
    kept = complete_runs(out)
    import toy_models.runs as runs
    real = runs.save_file

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(runs, "save_file", full)
    r = CliRunner().invoke(app, ["reproduce", "--scale", "micro", "--out", str(out), "--stage", "base-E1,E1,thm2"])
    assert r.exit_code == 2, r.output
    one_line_error(r.output, "no space left")
    assert not list(out.glob("stages/base-E1-*/result.json"))  # no record of a stage that could not run
    assert_kept(kept, out)
    assert not lock_path(out).exists()
    monkeypatch.setattr(runs, "save_file", real)
    res = reproduce(out, "micro", only=["base-E1", "E1", "thm2"])
    assert all(r["status"] == "done" for r in res["records"].values())
    assert_kept(kept, out)


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A directory every write under which answers EROFS (patched: chmod does not stop root, and
    `test_a_really_full_file_system` covers a real file system)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open, real_mkdir, real_mkstemp = os.open, os.mkdir, __import__("tempfile").mkstemp

    def under(p) -> bool:
        return str(Path(p).absolute()).startswith(str(ro) + os.sep)

    def deny(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))

    def open_(p, flags, *a, **k):
        if under(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            deny(p)
        return real_open(p, flags, *a, **k)

    def mkdir_(p, *a, **k):
        if under(p):
            deny(p)
        return real_mkdir(p, *a, **k)

    def mkstemp_(*a, dir=None, **k):
        if dir is not None and under(Path(dir) / "x"):
            deny(dir)
        return real_mkstemp(*a, dir=dir, **k)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir_)
    monkeypatch.setattr("tempfile.mkstemp", mkstemp_)
    return ro


def test_a_read_only_output_directory(read_only, tmp_path):
    for args in (["reproduce", "--scale", "micro", "--stage", "thm2", "--out", str(read_only / "study")],
                 _pretrain_args(read_only / "base")):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2, r.output
        one_line_error(r.output, "Read-only file system")
    assert list(read_only.iterdir()) == []


def test_ctrl_c_ends_in_one_line_and_resume_continues(tmp_path):
    out = tmp_path / "base"
    args = _pretrain_args(out, steps=3000, every=1000)
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a suite started in the background inherits SIGINT ignored, and Python then
                            # never raises KeyboardInterrupt: give the child a user's default Ctrl-C
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "provenance.json").is_file() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # before the first checkpoint (step 1000)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    one_line_error(err, "interrupted")
    run = RunDir(out)
    assert run.started and not run.complete and not lock_path(out).exists()
    r = cli(*_pretrain_args(out, steps=3000, every=1000), "--resume")
    assert r.returncode == 0, r.stderr
    assert run.complete


# -- another thread count ----------------------------------------------------------------------


def test_a_study_resumed_with_another_thread_count_keeps_its_own(tmp_path):
    out = tmp_path / "study"
    reproduce(out, "micro", only=["base-E2"])  # this process: one torch thread
    code = ("import sys, torch; torch.set_num_threads(2); from study.reproduce import reproduce; "
            "r = reproduce(sys.argv[1], 'micro', only=['base-E2', 'E2']); print('\\n'.join(r.get('notes', [])))")
    r = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "2"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    runs = [p.parent for p in out.glob("stages/E2-*/*/provenance.json")]
    assert runs
    for run in runs:
        assert json.loads((run / "provenance.json").read_text())["torch_threads"] == 1, run
    assert "trained at 1 torch thread(s); it keeps 1 (not 2)" in r.stdout
    # the same bits as the same stage in a study that only ever ran at one thread
    ref = tmp_path / "ref"
    reproduce(ref, "micro", only=["base-E2", "E2"])
    for run in runs:
        twin = next(ref.glob(f"stages/E2-*/{run.name}"))
        assert (run / "method.safetensors").read_bytes() == (twin / "method.safetensors").read_bytes(), run.name
