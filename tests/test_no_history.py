"""No history in the code: a .py file says why it is as it is, not when or by which issue. Issue
numbers, commit ids, dates of work, work-log remarks and line counts that defend a file's length
belong in docs/history.md, so no comment, docstring or string of a tracked (or untracked, not
ignored) .py file may hold one. Reads the files as text (tokenize), so it imports nothing heavy."""
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# In comments and in every string (a help text or a message is read by a user too).
ANYWHERE = {
    "issue number": re.compile(r"\bissues?\s+#?\d+|\bissue\s+#\d+|#\d+\s*\(issue\b", re.I),
    "date": re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b"),
    "work-log remark": re.compile(r"\bthis\s+session\b|\b(?:proposed|sent|reported|addressed)\s+to\s+the\s+lead\b", re.I),
}
# Only in comments and docstrings: code may hold hashes, and data may count lines.
PROSE = {
    "commit id": re.compile(
        r"\bcommit\s+[0-9a-f]{7,40}\b|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", re.I),
    "line count of the file": re.compile(
        r"\(\s*~?\d[\d,]*\s+lines\b"  # a parenthesis that opens with the file's line count
        r"|\b\d[\d,]*\s+lines\b[^.;]{0,60}?\b(?:guide|guideline|on\s+purpose)\b"
        r"|~\d+[- ]lines?\s+guide\b|\bthe\s+~?\d+[- ]line\s+(?:guide|guideline)\b"
        r"|\b(?:file|module)\s+(?:is|has)\s+(?:about\s+|over\s+|under\s+|just\s+|~)*\d[\d,]*\s+lines\b"
        r"|\b\d[\d,]*\s+lines\s+(?:long|of\s+code)\b", re.I),
}
# (path, kind) pairs whose matches are not history. Keep it empty unless a match is data.
ALLOW: set[tuple[str, str]] = set()

_STRING_TYPES = {tokenize.STRING} | ({tokenize.FSTRING_MIDDLE} if hasattr(tokenize, "FSTRING_MIDDLE") else set())
_STATEMENT_START = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}


def python_files(root: Path = ROOT) -> list[str]:
    """Every tracked .py file and every untracked one git does not ignore, relative to `root`."""
    cmd = ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.py"]
    out = subprocess.run(cmd, capture_output=True, check=True).stdout.decode()
    return sorted({p for p in out.split("\0") if p and (root / p).is_file()})


def chunks(source: str):
    """(line, text, is_prose) for each comment and string token of `source`: prose is a comment
    or a docstring (a string that is a statement of its own)."""
    prev = tokenize.ENCODING
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string, True
        elif tok.type in _STRING_TYPES:
            yield tok.start[0], tok.string, tok.type == tokenize.STRING and prev in _STATEMENT_START
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            prev = tok.type
        elif tok.type == tokenize.NL and prev in _STATEMENT_START:
            prev = tokenize.NL


def history_in(source: str, path: str = "<string>") -> list[str]:
    """'path:line: kind: match' for each piece of history in `source`."""
    found = []
    for line, text, prose in chunks(source):
        for kind, rx in [*ANYWHERE.items(), *(PROSE.items() if prose else ())]:
            if (path, kind) in ALLOW:
                continue
            for m in rx.finditer(text):
                at = line + text.count("\n", 0, m.start())
                found.append(f"{path}:{at}: {kind}: {' '.join(m.group(0).split())!r}")
    return found


# The fixtures name history through placeholders, so this file holds none itself.
HISTORY = {"issue": "issue", "n": 19, "date": "-".join(("2026", "12", "03")), "sha": "3fa9c01e",
           "session": " ".join(("this", "session")),
           "proposed": " ".join(("proposed", "to", "the", "lead"))}


@pytest.mark.parametrize("bad, kind", [
    ('"""Each experiment is one module ({issue} {n}): ..."""\n', "issue number"),
    ("x = 1  # see Issues {n} and 21\n", "issue number"),
    ('def f():\n    """Fixed in commit {sha}."""\n', "commit id"),
    ("# reverted by {sha}2b\n", "commit id"),
    ('"""One loop.\n(521 lines, just over the ~500 guide: fit is fit_many.)\n"""\n', "line count of the file"),
    ("# this module is 612 lines long on purpose\n", "line count of the file"),
    ('MSG = "measured {date} on the box"\n', "date"),
    ("# CLI {proposed} {session}\n", "work-log remark"),
])
def test_the_checker_flags_history(bad, kind):
    found = history_in(bad.format(**HISTORY), "bad.py")
    assert any(f": {kind}: " in f for f in found), found


@pytest.mark.parametrize("good", [
    '"""No function over 80 lines in study/: 81 lines fail, 80 pass."""\n',
    'def f():\n    """30 steps of 4 lines at lr 0.05."""\n',
    'H = "{sha}2b"  # a data hash, not prose\n',
    "x = issue_count + 1  # the number of issues is counted, not cited\n",
    "# a decade 2020s, a shape 4/4/256, a seed 1234567\n",
])
def test_the_checker_leaves_technical_text_alone(good):
    assert history_in(good.format(**HISTORY), "good.py") == []


def test_the_checker_reports_the_line_of_a_match_inside_a_docstring():
    src = '"""First line.\n\nThird line names {issue} {n}.\n"""\n'.format(**HISTORY)
    assert history_in(src, "m.py") == ["m.py:3: issue number: '{issue} {n}'".format(**HISTORY)]


def test_the_file_list_holds_this_test_and_no_virtualenv():
    files = python_files()
    assert "tests/test_no_history.py" in files
    assert not any(f.startswith((".venv/", "venv/")) for f in files)


def test_no_py_file_carries_history():
    found = []
    for path in python_files():
        try:
            found += history_in((ROOT / path).read_text(encoding="utf-8"), path)
        except (SyntaxError, tokenize.TokenError) as e:
            found.append(f"{path}: cannot be tokenized: {e}")
    assert not found, "history in .py files (it goes to docs/history.md):\n" + "\n".join(found)


# The reference docs and the README answer what a reader looks up; their history is docs/history.md.
REFERENCE_DOCS = ("README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md") if p.name != "history.md"))


def history_in_prose(text: str, path: str) -> list[str]:
    """The ANYWHERE patterns and commit ids, line by line, in a Markdown file."""
    commit = re.compile(r"\bcommits?\s+[0-9a-f]{7,40}\b", re.I)
    return [f"{path}:{i}: {kind}: {m.group(0)!r}" for i, line in enumerate(text.splitlines(), 1)
            for kind, rx in [*ANYWHERE.items(), ("commit id", commit)] for m in rx.finditer(line)]


def test_the_prose_checker_flags_history():
    bad = f"measured {HISTORY['date']} for issue {HISTORY['n']}, on commit {HISTORY['sha']}"
    assert len(history_in_prose("fine\n" + bad, "x.md")) == 3
    assert history_in_prose("the 94.0 % ceiling, 12,288 parameters", "x.md") == []


def test_no_reference_doc_carries_history():
    assert "docs/methods.md" in REFERENCE_DOCS and "docs/history.md" not in REFERENCE_DOCS
    found = [f for path in REFERENCE_DOCS for f in history_in_prose((ROOT / path).read_text(encoding="utf-8"), path)]
    assert not found, "history in the reference docs (it goes to docs/history.md):\n" + "\n".join(found)
