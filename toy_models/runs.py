"""Run directories: resolved config, provenance, metrics and safetensors checkpoints.

A run directory holds
    config.json           resolved config (model, task spec, task, training, method, base)
    provenance.json       command line, seed, package versions, python, platform, time
    metrics.jsonl         one line per evaluation during training
    checksums.json        SHA-256 of the run's tensor files, written just before metrics.json
    metrics.json          final metrics; written last, its presence marks the run complete
    model.safetensors     base weights (pretrain / full fine-tuning); metadata carries the config
    method.safetensors    a tuned method's tensors (LoRA factors, prompt, prefix keys/values...)
    train_state.*         optimizer state for --resume (removed when the run completes)
Every write is atomic (temporary file + os.replace), so a run that failed on the way (disk full,
permission, Ctrl-C) is never complete: `--resume` continues it. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from prefixlab_common.errors import UserError

MODEL_FILE = "model.safetensors"
METHOD_FILE = "method.safetensors"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """The project's one atomic file write: `write(tmp)` fills a temporary file in `path`'s folder
    (created if missing), which then replaces `path` (os.replace), so a reader never sees half a
    file and a failed write leaves the old one. The file gets the permissions of any new file
    (mkstemp makes 0600). An OSError names `path`, the file the user knows, not the temporary one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    """`text` (UTF-8) to `path`, atomically (`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def check_overwrite(path: Path, overwrite: bool, alternative: str = "") -> None:
    """The project's one refusal of an existing output: a UserError unless `overwrite` (the
    command's --overwrite). alternative: another way out, appended to the message
    (" or --resume to continue an interrupted run")."""
    if Path(path).exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it{alternative}")


def write_json(path: Path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, w)


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e.__class__.__name__}): the run is corrupt") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata_ = {"prefixlab": json.dumps(meta or {}, sort_keys=True)}
    atomic_write(path, lambda tmp: _save_file(tensors, tmp, metadata_))


def _save_file(tensors: dict, tmp: str, metadata: dict) -> None:
    try:
        save_file(tensors, tmp, metadata=metadata)
    except SafetensorError as e:  # safetensors reports a full disk as "... (os error 28)"
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), tmp) from e


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return _read_checkpoint(path, load_file)


def load_tensors_meta(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the prefixlab metadata `save_tensors` wrote with them ({} if none), from one
    opening of the file (a checkpoint and the step it belongs to)."""
    def read(p: str):
        with safe_open(p, framework="pt") as handle:
            return ({name: handle.get_tensor(name) for name in handle.keys()},
                    json.loads((handle.metadata() or {}).get("prefixlab", "{}")))
    return _read_checkpoint(path, read)


def _read_checkpoint(path: Path, read):
    """read(str path) of a safetensors file; a missing or unreadable one is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} is missing")
    try:
        return read(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is corrupt or not a safetensors file ({str(e).splitlines()[0][:80]})") from None


def set_aside(path: Path, why: str = "corrupt") -> Path:
    """Rename a broken file or directory out of the way (never delete it): path.<why>-<time>."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest = path.with_name(f"{path.name}.{why}-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.{why}-{stamp}-{n}")
    os.replace(path, dest)
    return dest


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "transformer-lens", "transformers", "numpy", "safetensors", "plotly", "typer",
                "prefixlab"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def provenance(seed: int, **extra) -> dict:
    """extra: e.g. the device a run trained on (kept out of config.json, so a run may resume on
    another device). torch_threads: the CPU's float summation order depends on it, so the same
    run at 1 and 2 threads ends in different bits (a study's --workers 1 and 2 differ this way)."""
    return {"argv": sys.argv, "command": " ".join(sys.argv), "seed": seed, "versions": versions(),
            "torch_threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cwd": os.getcwd(), **extra}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- state -------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return (self.path / "metrics.json").is_file()

    @property
    def resumable(self) -> bool:
        """It holds a checkpoint to continue from."""
        return (self.path / "train_state.json").is_file() and not self.complete

    @property
    def started(self) -> bool:
        """An interrupted run: begun (config.json) but not complete; --resume continues it, from
        its last checkpoint or, killed before the first one, from step 0."""
        return (self.path / "config.json").is_file() and not self.complete

    def verify(self) -> list[str]:
        """The tensor files of a complete run whose bytes differ from the SHA-256 its
        checksums.json recorded (missing files included); [] for runs written before it existed."""
        p = self.path / "checksums.json"
        if not p.is_file():
            return []
        try:
            sums = read_json(p)
        except UserError:
            return ["checksums.json"]
        return [name for name, digest in sums.items()
                if not (self.path / name).is_file() or sha256(self.path / name) != digest]

    def check_new(self, overwrite: bool, resume: bool, resumable: bool = True) -> None:
        """Refuse an existing output unless --overwrite or --resume says what to do with it.
        Called before anything is written. `resumable=False`: the command has no --resume, and its
        refusal does not offer one."""
        if not self.path.exists():
            if resume:
                raise UserError(f"nothing to resume at {self.path}")
            return
        if resume:
            if self.complete:
                raise UserError(f"run {self.path} is already complete; nothing to resume")
            if not self.started:
                raise UserError(f"{self.path} holds no interrupted run to resume")
            return
        if not self.path.is_dir():
            raise UserError(f"{self.path} exists and is not a run directory")
        if any(self.path.iterdir()):
            check_overwrite(self.path, overwrite, " or --resume to continue an interrupted run" if resumable else "")

    def prepare(self, overwrite: bool, resume: bool) -> None:
        if overwrite and self.path.exists() and not resume:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    # -- files -------------------------------------------------------------------------------
    def write_json(self, name: str, obj) -> None:
        write_json(self.path / name, obj)

    def read_json(self, name: str) -> dict:
        return read_json(self.path / name)

    def append_metrics(self, row: dict) -> None:
        # the whole file is rewritten atomically: a kill never leaves half a line
        rows = self.metrics_rows() + [row]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        write_text(self.path / "metrics.jsonl", text)

    def metrics_rows(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, step: int) -> None:
        rows = [r for r in self.metrics_rows() if r.get("step", 0) <= step]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        write_text(self.path / "metrics.jsonl", text)

    @property
    def config(self) -> dict:
        if not self.path.is_dir():
            raise UserError(f"no run at {self.path}")
        if not (self.path / "config.json").exists():
            inner = sorted(p.name for p in self.path.iterdir() if (p / "config.json").is_file())
            if inner:  # a --seeds (seed0/, seed1/...) or several-task parent: its runs are one level down
                raise UserError(f"{self.path} holds {len(inner)} runs, not one ({', '.join(n + '/' for n in inner)}); "
                                f"pass one of them, e.g. {self.path / inner[0]}")
        return self.read_json("config.json")

    def finish(self, metrics: dict, files: tuple[str, ...] = ()) -> None:
        """Complete the run: the checksums of its tensor `files`, then metrics.json (the marker)."""
        self.write_json("checksums.json", {name: sha256(self.path / name) for name in files})
        self.write_json("metrics.json", metrics)
        for name in ("train_state.json", "train_state.safetensors"):
            (self.path / name).unlink(missing_ok=True)
