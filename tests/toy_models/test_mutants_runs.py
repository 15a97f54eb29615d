"""toy_models/runs.py, the run store's checks: tests written against the mutants that survived
`make mutate MODULES=toy_models/runs.py` (docs/tests.md, "Every survivor"). They call the store
directly: atomic writes and their errors, JSON and safetensors reading with its messages, the
SHA-256 verification, the checks before a run starts, metrics rows, and setting files aside."""

import errno
import hashlib
import json
import os
import re
import stat
import sys
import time

import pytest
import torch
from safetensors import safe_open

import toy_models.runs as runs
from prefixlab_common.errors import UserError
from toy_models.runs import RunDir, load_tensors, read_json, save_tensors, set_aside, sha256, write_json


def test_write_json_is_sorted_indented_newline_terminated_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "sub" / "dir" / "a.json"  # parents are made, two levels
    write_json(p, {"b": 1, "a": [1, 2]})
    assert p.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert read_json(p) == {"a": [1, 2], "b": 1}
    assert [f.name for f in p.parent.iterdir()] == ["a.json"]
    mode = stat.S_IMODE(os.stat(p).st_mode)
    assert mode == 0o666 & ~runs.current_umask()


def test_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert runs.current_umask() == 0o027 and runs.current_umask() == 0o027
    finally:
        os.umask(old)


def test_a_failed_write_names_the_users_file_and_cleans_up(tmp_path):
    p = tmp_path / "x.json"

    def boom(tmp):
        assert os.path.exists(tmp) and os.path.basename(tmp).startswith(".x.json.") and tmp.endswith(".tmp")
        assert os.path.dirname(tmp) == str(p.parent)  # beside the file: os.replace stays on one filesystem
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    with pytest.raises(OSError) as e:
        runs.atomic_write(p, boom)
    assert (e.value.errno, e.value.strerror, e.value.filename) == (errno.ENOSPC, "No space left on device", str(p))
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError) as e:  # the directory cannot be made: its path is a file
        write_json(blocker / "y.json", {})
    assert e.value.filename == str(blocker / "y.json") and e.value.errno is not None
    assert e.value.strerror == os.strerror(e.value.errno)


def test_read_json_messages(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'no.json'} is missing")):
        read_json(tmp_path / "no.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=re.escape(f"{bad} is not valid JSON (JSONDecodeError): the run is corrupt")):
        read_json(bad)
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match=re.escape("(UnicodeDecodeError)")):
        read_json(bad)


def test_tensors_round_trip_with_their_metadata(tmp_path):
    p = tmp_path / "t.safetensors"
    a = torch.arange(6.0).reshape(2, 3).t()  # not contiguous
    b = torch.ones(2, requires_grad=True)
    save_tensors(p, {"a": a, "b": b}, {"k": "v", "config": {"y": 2, "x": 1}})  # keys written sorted
    got = load_tensors(p)
    assert set(got) == {"a", "b"} and torch.equal(got["a"], a) and torch.equal(got["b"], b.detach())
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"prefixlab": '{"config": {"x": 1, "y": 2}, "k": "v"}'}
    save_tensors(p, {"a": a})
    with safe_open(str(p), "pt") as f:
        assert f.metadata() == {"prefixlab": "{}"}
    assert [f.name for f in tmp_path.iterdir()] == ["t.safetensors"]


def test_load_tensors_messages(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"checkpoint {tmp_path / 'no.safetensors'} is missing")):
        load_tensors(tmp_path / "no.safetensors")
    with pytest.raises(UserError, match="is missing"):
        load_tensors(tmp_path)  # a directory is not a checkpoint
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage that is not a header\nsecond line")
    with pytest.raises(UserError, match=re.escape(f"checkpoint {bad} is corrupt or not a safetensors file (")) as e:
        load_tensors(bad)
    assert "second line" not in str(e.value) and len(str(e.value)) < len(str(bad)) + 130


def test_load_tensors_quotes_the_first_80_characters_of_the_first_line(tmp_path, monkeypatch):
    p = tmp_path / "t.safetensors"
    p.write_bytes(b"x")

    def fail(path):
        raise ValueError("y" * 100 + "\nsecond line")

    monkeypatch.setattr(runs, "load_file", fail)
    with pytest.raises(UserError) as e:
        load_tensors(p)
    assert str(e.value) == f"checkpoint {p} is corrupt or not a safetensors file ({'y' * 80})"


def test_a_full_disk_from_safetensors_is_an_oserror_with_its_errno(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" }) (os error 28)")

    monkeypatch.setattr(runs, "save_file", full)
    with pytest.raises(OSError) as e:
        save_tensors(tmp_path / "t.safetensors", {"a": torch.ones(1)})
    assert (e.value.errno, e.value.strerror) == (28, os.strerror(28))
    assert e.value.filename == str(tmp_path / "t.safetensors")
    assert not isinstance(e.value, SafetensorError) and list(tmp_path.iterdir()) == []

    def other(*a, **k):
        raise SafetensorError("some other failure")

    monkeypatch.setattr(runs, "save_file", other)
    with pytest.raises(SafetensorError, match="some other failure"):
        save_tensors(tmp_path / "t.safetensors", {"a": torch.ones(1)})


def test_set_aside_renames_never_deletes(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261203T120000" if fmt == "%Y%m%dT%H%M%S" else "?")
    f = tmp_path / "m.json"
    f.write_text("1")
    d1 = set_aside(f)
    assert d1 == tmp_path / "m.json.corrupt-20261203T120000" and d1.read_text() == "1" and not f.exists()
    f.write_text("2")
    d2 = set_aside(f)
    assert d2 == tmp_path / "m.json.corrupt-20261203T120000-2" and d2.read_text() == "2"
    f.write_text("3")
    assert set_aside(str(f), "stale") == tmp_path / "m.json.stale-20261203T120000"
    f.write_text("4")
    assert set_aside(f).name == "m.json.corrupt-20261203T120000-3"
    (tmp_path / "run").mkdir()
    assert set_aside(tmp_path / "run").is_dir()


def test_sha256_of_a_file_larger_than_one_read(tmp_path):
    data = os.urandom((1 << 20) + 12345)
    p = tmp_path / "big"
    p.write_bytes(data)
    assert sha256(p) == hashlib.sha256(data).hexdigest()
    p.write_bytes(b"")
    assert sha256(p) == hashlib.sha256(b"").hexdigest()


def test_versions_and_provenance(monkeypatch):
    v = runs.versions()
    assert v["python"] == sys.version.split()[0] and v["platform"]
    assert v["torch"] == torch.__version__.split("+")[0] or v["torch"] == torch.__version__
    assert set(v) == {"python", "platform", "torch", "transformer-lens", "transformers", "numpy",
                      "safetensors", "plotly", "typer", "prefixlab"}
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda p: real(p) if p != "plotly" else (_ for _ in ()).throw(
        metadata.PackageNotFoundError(p)))
    assert runs.versions()["plotly"] == "not installed"
    monkeypatch.setattr(sys, "argv", ["prefixlab", "pretrain", "--seed", "3"])
    p = runs.provenance(3, device="cpu")
    assert p["argv"] == ["prefixlab", "pretrain", "--seed", "3"] and p["command"] == "prefixlab pretrain --seed 3"
    assert p["seed"] == 3 and p["device"] == "cpu" and p["cwd"] == os.getcwd()
    assert p["torch_threads"] == torch.get_num_threads() and p["versions"]["plotly"] == "not installed"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", p["started"])


def test_run_states(tmp_path):
    r = RunDir(tmp_path / "r")
    assert (r.complete, r.resumable, r.started) == (False, False, False)
    r.write_json("config.json", {"model": {}})
    assert (r.complete, r.resumable, r.started) == (False, False, True)
    r.write_json("train_state.json", {"step": 5})
    assert (r.complete, r.resumable, r.started) == (False, True, True)
    r.write_json("metrics.json", {"exact_acc": 1.0})
    assert (r.complete, r.resumable, r.started) == (True, False, False)
    assert r.config == {"model": {}} and r.read_json("metrics.json") == {"exact_acc": 1.0}
    (tmp_path / "r" / "metrics.json").unlink()
    (tmp_path / "r" / "metrics.json").mkdir()  # not a file: not complete
    assert not r.complete
    with pytest.raises(UserError, match=re.escape(f"no run at {tmp_path / 'none'}")):
        RunDir(tmp_path / "none").config


def test_verify_finds_every_changed_or_missing_tensor_file(tmp_path):
    r = RunDir(tmp_path / "r")
    r.path.mkdir()
    (r.path / "a.safetensors").write_bytes(b"aaa")
    (r.path / "b.safetensors").write_bytes(b"bbb")
    (r.path / "train_state.json").write_text("{}")
    (r.path / "train_state.safetensors").write_text("")
    assert r.verify() == []  # written before checksums existed
    r.finish({"exact_acc": 0.5}, ("a.safetensors", "b.safetensors"))
    assert read_json(r.path / "metrics.json") == {"exact_acc": 0.5}
    assert read_json(r.path / "checksums.json") == {"a.safetensors": hashlib.sha256(b"aaa").hexdigest(),
                                                   "b.safetensors": hashlib.sha256(b"bbb").hexdigest()}
    assert r.complete and not (r.path / "train_state.json").exists() and not (r.path / "train_state.safetensors").exists()
    assert r.verify() == []
    (r.path / "b.safetensors").write_bytes(b"bbX")
    assert r.verify() == ["b.safetensors"]
    (r.path / "a.safetensors").unlink()
    assert r.verify() == ["a.safetensors", "b.safetensors"]
    (r.path / "checksums.json").write_text("{broken")
    assert r.verify() == ["checksums.json"]
    RunDir(tmp_path / "s").finish({})  # no train state to remove, no files
    assert read_json(tmp_path / "s" / "checksums.json") == {}


def test_check_new_refuses_each_case_with_its_message(tmp_path):
    p = tmp_path / "r"
    RunDir(p).check_new(overwrite=False, resume=False)  # nothing there: fine
    with pytest.raises(UserError, match=re.escape(f"nothing to resume at {p}")):
        RunDir(p).check_new(overwrite=False, resume=True)
    p.mkdir()
    RunDir(p).check_new(overwrite=False, resume=False)  # an empty directory is fine
    with pytest.raises(UserError, match=re.escape(f"{p} holds no interrupted run to resume")):
        RunDir(p).check_new(overwrite=False, resume=True)
    (p / "config.json").write_text("{}")
    with pytest.raises(UserError, match=re.escape(f"{p} already exists; pass --overwrite to replace it "
                                                  "or --resume to continue an interrupted run")):
        RunDir(p).check_new(overwrite=False, resume=False)
    with pytest.raises(UserError, match=re.escape(f"{p} already exists; pass --overwrite to replace it") + "$"):
        RunDir(p).check_new(overwrite=False, resume=False, resumable=False)  # a command without --resume
    RunDir(p).check_new(overwrite=True, resume=False)
    RunDir(p).check_new(overwrite=False, resume=True)  # started: resumable
    (p / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match=re.escape(f"run {p} is already complete; nothing to resume")):
        RunDir(p).check_new(overwrite=True, resume=True)
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(UserError, match=re.escape(f"{f} exists and is not a run directory")):
        RunDir(f).check_new(overwrite=True, resume=False)


def test_prepare_replaces_only_on_overwrite(tmp_path):
    p = tmp_path / "a" / "r"
    RunDir(p).prepare(overwrite=False, resume=False)
    assert p.is_dir()
    (p / "old").write_text("x")
    RunDir(p).prepare(overwrite=False, resume=False)
    RunDir(p).prepare(overwrite=True, resume=True)
    assert (p / "old").exists()
    RunDir(p).prepare(overwrite=True, resume=False)
    assert p.is_dir() and list(p.iterdir()) == []


def test_metrics_rows_append_and_truncate(tmp_path):
    r = RunDir(tmp_path / "r")
    r.path.mkdir()
    assert r.metrics_rows() == []
    for s in (10, 20, 30):
        r.append_metrics({"step": s, "b": 1, "a": 2})
    text = (r.path / "metrics.jsonl").read_text()
    assert text.splitlines()[0] == '{"a": 2, "b": 1, "step": 10}' and text.endswith("\n")
    (r.path / "metrics.jsonl").write_text(text + "\n   \n")  # blank lines are skipped
    assert [x["step"] for x in r.metrics_rows()] == [10, 20, 30]
    r.append_metrics({"note": "no step"})
    (r.path / "metrics.jsonl").write_text((r.path / "metrics.jsonl").read_text() + '{"step": 15, "b": 0, "a": 1}\n')
    r.truncate_metrics(20)
    assert '{"a": 1, "b": 0, "step": 15}' in (r.path / "metrics.jsonl").read_text().splitlines()  # rewritten sorted
    r.truncate_metrics(20)
    assert r.metrics_rows() == [{"a": 2, "b": 1, "step": 10}, {"a": 2, "b": 1, "step": 20}, {"note": "no step"},
                                {"a": 1, "b": 0, "step": 15}]
    assert (r.path / "metrics.jsonl").read_text().endswith("\n")
    r.truncate_metrics(0)
    assert r.metrics_rows() == [{"note": "no step"}]
    assert sorted(f.name for f in r.path.iterdir()) == ["metrics.jsonl"]
