"""The test files have unique basenames: without __init__.py files pytest imports each by its
basename, and two files of one name stop the whole suite at collection."""

from collections import Counter
from pathlib import Path


def test_test_file_basenames_are_unique():
    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []
