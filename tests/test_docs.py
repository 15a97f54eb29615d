"""The lab's account of the science (docs/papers.md) and the references to it.

- docs/papers.md has exactly the sections the code cites, Glossary first.
- Every mention of papers.md in the project's text files is a citation `docs/papers.md §N` whose
  §N (and every §M listed right after it: "§1, §6, §6b", "§3–§6") is one of those sections.
- No file points outside the repository (the sibling `shared/` folder, absolute work paths).
The checkers are plain functions, tested on small strings below so that each can be seen to fail.
Standard library only: no torch, no project imports.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPERS = ROOT / "docs" / "papers.md"
SECTIONS = ("0", "1", "2", "3", "3b", "4", "5", "6", "6b", "7")
HEADINGS = (
    "## §0 Glossary",
    "## §1 Methods and parameterizations",
    "## §2 The toy tasks",
    "## §3 Toy models and the experiments E1–E4",
    "## §3b What [P]'s own runs looked like",
    "## §4 The identities the probes test",
    "## §5 The constructions",
    "## §6 Why reparameterization helps ([L])",
    "## §6b What [L]'s theory predicts, and what their code did",
    "## §7 Beyond the papers: Prefix-Tuning+",
)
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".sh", ".yml", ".yaml", ".json"}
TEXT_NAMES = {"Makefile"}
SKIP_DIRS = {".git", ".venv", "runs", "build", "out", "mutants", "__pycache__", ".pytest_cache",
             ".hypothesis", "node_modules"}
THIS = Path(__file__).resolve()

# a citation: docs/papers.md §N, then optionally more sections: ", §M", " and §M", "–§M"
_CITATION = re.compile(r"docs/papers\.md §(\w+)((?:(?:, | and |–|-)§\w+)*)")
_MORE = re.compile(r"§(\w+)")
_MENTION = re.compile(r"papers\.md")
# paths that leave the repository; the sibling folder's name is built here, so this file names no such path
SIBLING = "sha" + "red"
_OUTSIDE = (
    (re.compile(r"\.\./" + SIBLING + r"\b"), "../" + SIBLING),
    (re.compile(r"(?<![\w.-])shared/(?:papers|architecture|style|fidelity-checks)\.md"), "a file of shared/"),
    (re.compile(r"(?<![\w.-])shared/(?:bench|hooks)\b"), "a folder of shared/"),
    (re.compile(r"fidelity-checks\.md|bench_vs_petrov|petrov_mingpt"), "a file kept outside the repo"),
    (re.compile(r"(?<![\w.-])/work/"), "an absolute /work/ path"),
    (re.compile(r"(?<![\w.-])/home/\w"), "an absolute home path"),
)


def section_ids(text: str) -> list[str]:
    """The §ids of the `## §N Title` headings of a papers.md text, in order."""
    return re.findall(r"^## §(\w+) ", text, flags=re.M)


def citation_errors(text: str, sections) -> list[str]:
    """Every mention of papers.md in `text` that is not a citation `docs/papers.md §N` of a known
    section (each §M listed after it checked too); one message per bad mention, with its line."""
    sections, errors, good = set(sections), [], set()
    for m in _CITATION.finditer(text):
        ids = [m.group(1)] + _MORE.findall(m.group(2))
        bad = [i for i in ids if i not in sections]
        good.add(m.start() + len("docs/"))
        if bad:
            line = text.count("\n", 0, m.start()) + 1
            errors.append(f"line {line}: {m.group(0)!r} cites §{', §'.join(bad)}, not a section of docs/papers.md")
    for m in _MENTION.finditer(text):
        if m.start() not in good:
            line = text.count("\n", 0, m.start()) + 1
            ctx = text[max(0, m.start() - 20):m.end() + 12].replace("\n", " ")
            errors.append(f"line {line}: {ctx!r} is not a citation of the form 'docs/papers.md §N'")
    return errors


def outside_path_errors(text: str) -> list[str]:
    """Every reference in `text` to a path outside the repository."""
    errors = []
    for pattern, what in _OUTSIDE:
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            errors.append(f"line {line}: {m.group(0)!r} points outside the repo ({what})")
    return errors


def project_text_files() -> list[Path]:
    """Tracked files plus untracked files git does not ignore, as text by suffix or name; without
    git (an exported tree), a walk that skips build, run and environment folders."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.splitlines()
        paths = [ROOT / p for p in out]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for d, dirs, files in os.walk(ROOT):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.endswith(".egg-info")]
            paths += [Path(d) / f for f in files]
    keep = []
    for p in paths:
        rel = p.relative_to(ROOT)
        text = p.suffix in TEXT_SUFFIXES or p.name in TEXT_NAMES or rel.as_posix() == ".ci/run"
        if text and p.is_file() and not (set(rel.parts) & SKIP_DIRS):
            keep.append(p)
    return sorted(set(keep))


def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# The checkers, on small strings: each must be able to fail.


def test_citation_checker_accepts_good_citations():
    text = ("see docs/papers.md §3b and docs/papers.md §1, §6, §6b;\n"
            "the table (docs/papers.md §3–§6), E4 in docs/papers.md §3 (E4).")
    assert citation_errors(text, SECTIONS) == []


@pytest.mark.parametrize("bad", [
    "see docs/papers.md §8",              # no such section
    "see docs/papers.md §1, §9",          # a listed section that does not exist
    "see docs/papers.md §3c",             # a suffix that is not a section
    "see papers.md §4",                   # not the path in the repo
    "see papers.md E4",                   # not a section
    "see docs/papers.md for the theory",  # no section at all
    "the papers.md test sample",
    "papers.md Fig. 5",
])
def test_citation_checker_rejects(bad):
    errors = citation_errors("first line\n" + bad, SECTIONS)
    assert len(errors) == 1 and errors[0].startswith("line 2:"), errors


def test_section_ids_reads_headings_only():
    text = "# T\n## §0 Glossary\n## §1 A\ntext §2\n### §9 sub\n## §3b B\n"
    assert section_ids(text) == ["0", "1", "3b"]


@pytest.mark.parametrize("bad", [
    f"python ../{SIBLING}/bench/bench_vs_petrov.py",
    f"the science is in {SIBLING}/papers.md",
    f"--petrov-dir {SIBLING}/bench/petrov_mingpt",
    "see fidelity-checks.md",
    "cat /work/notes/common.md",
    "open /home/user/model",
])
def test_outside_path_checker_rejects(bad):
    assert outside_path_errors(bad), bad


@pytest.mark.parametrize("good", [
    "runs/mutate/work/<module>/mutants/",   # a folder named work inside the repo
    "the shared head (leading SLOT positions once per batch)",
    "one MLP shared/per layer",
    "docs/papers.md §6b",
])
def test_outside_path_checker_accepts(good):
    assert outside_path_errors(good) == []


# ---------------------------------------------------------------------------------------------
# The repository.


def test_papers_md_has_the_cited_sections():
    text = _read(PAPERS)
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == list(HEADINGS)
    assert section_ids(text) == list(SECTIONS)


def test_file_list_covers_the_project():
    files = {p.relative_to(ROOT).as_posix() for p in project_text_files()}
    assert {"cli.py", "docs/papers.md", "tests/test_docs.py", "pyproject.toml", "Makefile"} <= files
    assert not any(f.startswith(".venv/") for f in files)


def test_every_papers_md_citation_resolves():
    sections = section_ids(_read(PAPERS))
    errors = []
    for p in project_text_files():
        if p in (PAPERS.resolve(), THIS):
            continue
        errors += [f"{p.relative_to(ROOT)}: {e}" for e in citation_errors(_read(p), sections)]
    assert not errors, "\n".join(errors)


def test_nothing_points_outside_the_repo():
    errors = []
    for p in project_text_files():
        if p == THIS:
            continue
        errors += [f"{p.relative_to(ROOT)}: {e}" for e in outside_path_errors(_read(p))]
    assert not errors, "\n".join(errors)
