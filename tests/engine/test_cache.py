"""The engine's stage cache (`engine.cache`): a record is reused only when it is whole and is this
stage's own (its name and its key), and the one-line end of a study whose Ray went away
(`engine.parallel`). No experiment is imported: the stages here are plain functions."""

import json
from types import SimpleNamespace

import pytest

from engine import parallel
from engine.cache import cached, run_stage, stage_dir
from engine.driver import run_stages, stage_keys
from engine.stage import Stage
from prefixlab_common.errors import UserError


def _double(d, cfg, up, progress, device=None):
    return {"value": 2 * cfg["x"]}


def _stage(x=1, name="double"):
    return Stage(name, "doubles x", {"x": x}, _double)


def test_a_finished_stage_is_reused_and_a_changed_config_is_not(tmp_path):
    first = run_stages(tmp_path, [_stage(1)])["double"]
    assert first["status"] == "done" and first["result"] == {"value": 2} and not first["cached"]
    again = run_stages(tmp_path, [_stage(1)])["double"]
    assert again["cached"] and again["result"] == {"value": 2}
    other = run_stages(tmp_path, [_stage(3)])["double"]
    assert not other["cached"] and other["result"] == {"value": 6}


def _record_under(tmp_path, stage, key, rec):
    marker = stage_dir(tmp_path, stage, key) / "result.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(rec))
    return marker


def test_a_record_carrying_another_stages_key_is_set_aside(tmp_path):
    """A whole, done record under this stage's directory whose key is another stage's (a copied
    directory, a hand edit) is not this stage's result: set aside and recomputed."""
    stage = _stage(1)
    key = stage_keys([stage])["double"]
    rec = run_stage(tmp_path, stage, key, {}, None)
    other_key = stage_keys([_stage(5)])["double"]
    assert other_key != key
    marker = _record_under(tmp_path, stage, key, {**rec, "key": other_key})
    notes = []
    assert cached(tmp_path, stage, key, notes.append) is None
    assert not marker.exists() and len(notes) == 1 and "belongs to another stage" in notes[0]
    assert list(marker.parent.glob("result.json.corrupt-*"))


def test_a_record_carrying_another_stages_name_is_set_aside(tmp_path):
    stage = _stage(1)
    key = stage_keys([stage])["double"]
    rec = run_stage(tmp_path, stage, key, {}, None)
    _record_under(tmp_path, stage, key, {**rec, "name": "triple"})
    assert cached(tmp_path, stage, key) is None


@pytest.mark.parametrize("bad", ["not json {", json.dumps([1, 2]), json.dumps({"name": "double", "status": "done"})])
def test_a_record_that_does_not_read_back_whole_is_recomputed(tmp_path, bad):
    stage = _stage(1)
    key = stage_keys([stage])["double"]
    marker = stage_dir(tmp_path, stage, key) / "result.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(bad)
    assert cached(tmp_path, stage, key) is None
    assert run_stages(tmp_path, [stage])["double"]["result"] == {"value": 2}


def test_a_key_hashes_the_name_the_config_and_the_upstream_keys():
    up = Stage("up", "", {"a": 1}, _double)
    down = Stage("down", "", {"b": 1}, _double, needs=("up",))
    keys = stage_keys([up, down])
    assert keys != stage_keys([Stage("up", "", {"a": 2}, _double), down])  # upstream config: both change
    assert stage_keys([Stage("up", "", {"a": 2}, _double), down])["down"] != keys["down"]
    assert Stage("other", "", {"a": 1}, _double).key({}) != keys["up"]
    with pytest.raises(UserError, match="unknown stage 'nope'"):
        stage_keys([up], only=["nope"])


class _FakeRay:
    """Enough of the ray module for run_parallel to reach its driver loop."""

    def __init__(self):
        self.shut = False

    def remote(self, *a, **k):
        return lambda fn: SimpleNamespace(remote=lambda *a, **k: None, options=lambda **k: None)

    def cluster_resources(self):
        return {"CPU": 2}

    def shutdown(self):
        self.shut = True
        raise RuntimeError("a dead Ray does not shut down cleanly either")


@pytest.mark.parametrize("error", ["ActorDiedError", "RaySystemError", "WorkerCrashedError", "NodeDiedError",
                                   "LocalRayletDiedError"])
def test_a_ray_that_dies_under_the_study_ends_it_in_one_line(tmp_path, monkeypatch, error):
    import ray.exceptions
    fake = _FakeRay()
    monkeypatch.setattr(parallel, "_init_ray", lambda workers, address, threads: (fake, True))
    exc = getattr(ray.exceptions, error)

    def die(*a, **k):
        try:
            err = exc()
        except TypeError:  # the ones that need a message
            err = exc("the raylet is gone")
        raise err
    monkeypatch.setattr(parallel, "_drive", die)
    with pytest.raises(UserError) as e:
        run_stages(tmp_path, [_stage(1)], workers=2)
    msg = str(e.value)
    assert "\n" not in msg and error in msg and fake.shut
    assert "local Ray instance stopped" in msg and "kept" in msg and "same command again to resume" in msg


def test_a_stage_error_is_not_mistaken_for_ray_dying(tmp_path, monkeypatch):
    fake = _FakeRay()
    monkeypatch.setattr(parallel, "_init_ray", lambda workers, address, threads: (fake, True))
    monkeypatch.setattr(parallel, "_drive", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        run_stages(tmp_path, [_stage(1)], workers=2)


def test_prefixlab_reproduce_ends_in_one_line_and_exit_2_when_ray_dies(tmp_path, monkeypatch):
    import ray.exceptions
    from typer.testing import CliRunner
    from cli import app
    monkeypatch.setattr(parallel, "_init_ray", lambda workers, address, threads: (_FakeRay(), True))

    def die(*a, **k):
        raise ray.exceptions.ActorDiedError()
    monkeypatch.setattr(parallel, "_drive", die)
    r = CliRunner().invoke(app, ["reproduce", "--scale", "micro", "--workers", "2", "--out", str(tmp_path / "s")])
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error:") and "same command again to resume" in lines[0]


def test_workers_auto_takes_one_worker_per_usable_core_and_bad_counts_exit_2(tmp_path):
    import os
    from typer.testing import CliRunner
    import cli
    assert cli._workers("auto") == len(os.sched_getaffinity(0))
    assert cli._workers("3") == 3
    for bad in ("0", "-1", "two", "1.5"):
        r = CliRunner().invoke(cli.app, ["reproduce", "--scale", "micro", "--workers", bad, "--out", str(tmp_path / bad)])
        assert r.exit_code == 2 and "--workers must be" in r.output, r.output
        assert not (tmp_path / bad).exists()
