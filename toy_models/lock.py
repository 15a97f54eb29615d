"""One writer per directory: an advisory lock (fcntl.flock) on a lock file beside the directory,
`<parent>/.<name>.lock`, holding the holder's pid and host.

The file sits beside the directory, not in it, so that replacing a run (--overwrite removes the
directory) keeps the lock, and an empty new run directory stays empty. A holder that ends removes
the file; a file left behind names a holder that died (kill -9, a lost node): flock is released
by the kernel with its process, so the next writer takes the lock over and says whose it was.
Processes of one study (Ray tasks) lock only the run directories they write; the study's driver
holds the study directory's lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from prefixlab_common.errors import UserError


# What the file system answers when the output cannot be written (full, read-only, forbidden): no
# fault of a stage or a run, so it ends the command with one line instead of being recorded.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def lock_path(directory: str | Path) -> Path:
    d = Path(directory).absolute()
    return d.parent / f".{d.name}.lock"


def _holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 4096, 0).decode()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _who(h: dict | None) -> str:
    return f"pid {h.get('pid')} on host {h.get('host')}" if h else "a process that has not said who it is"


class DirLock:
    """with DirLock(path, "study"): ... -- the one writer of `path` meanwhile.
    wait: seconds to wait for another holder (0: fail at once with a UserError naming it).
    taken_over: the previous holder's record when its process had died (else None)."""

    def __init__(self, directory: str | Path, what: str = "run", wait: float = 0.0):
        self.directory = Path(directory)
        self.path = lock_path(directory)
        self.what = what
        self.wait = wait
        self.fd: int | None = None
        self.taken_over: dict | None = None

    @property
    def note(self) -> str | None:
        """One line for the user when a dead holder's lock was taken over."""
        if self.taken_over is None:
            return None
        return (f"took over the lock of {self.directory}: its last writer ({_who(self.taken_over)}) "
                "is gone; its complete runs are kept and its interrupted ones resume")

    def acquire(self) -> DirLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            deadline = time.monotonic() + self.wait
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    os.close(fd)
                    if time.monotonic() < deadline:
                        time.sleep(0.2)
                        continue
                    raise UserError(f"{self.directory} is in use by another {self.what} ({_who(holder)}); "
                                    "wait for it to finish, or give another directory") from None
                if not self._current(fd):  # its last holder removed the file after we opened it
                    os.close(fd)
                    continue
                self.taken_over = _holder(fd)
                me = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
                self.fd = fd
        except OSError as e:
            if e.errno in STORAGE_ERRNOS:
                raise UserError(f"cannot write to {self.path.parent} ({e.strerror}): "
                                f"{self.directory} needs a writable place") from None
            raise
        return self

    def _current(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # removed while still held: a waiter re-opens it
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
