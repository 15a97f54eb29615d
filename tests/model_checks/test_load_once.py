"""The CLI loads a LLaMA model once per command: `identity-check --html --dilution` and
`dilution --html` check and measure the same loaded model; the outputs are those of two loads."""

import pytest
from typer.testing import CliRunner

import model_checks.check
import model_checks.dilution
import model_checks.models
from cli import app


@pytest.fixture
def loads(monkeypatch):
    calls = []
    real = model_checks.models.load_model

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    for mod in (model_checks.models, model_checks.check, model_checks.dilution):
        monkeypatch.setattr(mod, "load_model", counting)
    return calls


@pytest.mark.parametrize("argv", [
    ["identity-check", "--model", "tiny", "--dilution", "8,16", "--json"],
    ["identity-check", "--model", "tiny", "--soft-prompt", "random", "-P", "2", "--dilution", "8,16", "--json"],
    ["dilution", "--model", "tiny", "--lengths", "8,16", "--json"],
])
def test_one_load_per_command(loads, tmp_path, argv):
    page = tmp_path / "page.html"
    argv = argv + ["--html", str(page)]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    assert page.exists() and loads == ["tiny"]
