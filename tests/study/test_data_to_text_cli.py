"""`prefixlab data-to-text`: every bad input ends in one line and exit code 2, nothing written."""

import pytest
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


@pytest.mark.parametrize("args, msg", [
    (["--scale", "nope"], "unknown scale"),
    (["--scale", "micro", "--shares", "bogus"], "unknown prefix share"),
    (["--scale", "micro", "--sizes", "0,4"], "size"),
    (["--scale", "micro", "--lr", "none"], "lr"),
])
def test_bad_inputs_end_in_one_line(tmp_path, args, msg):
    out = tmp_path / "d2t.json"
    r = runner.invoke(app, ["data-to-text", *args, "--json-file", str(out)])
    assert r.exit_code == 2, r.output
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0].lower(), r.output
    assert not out.exists()


def test_an_existing_json_is_not_overwritten(tmp_path):
    out = tmp_path / "d2t.json"
    out.write_text("{}")
    r = runner.invoke(app, ["data-to-text", "--scale", "micro", "--json-file", str(out)])
    assert r.exit_code == 2 and out.read_text() == "{}"
