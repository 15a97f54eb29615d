"""The paper-vs-lab table's verdicts and explanations follow the numbers they are given."""
import pytest

from study.table import paper_vs_lab


def _sample_eff(none, simple, deep):
    acc = {s: {"32": {"mean": a[0]}, "2048": {"mean": a[1]}} for s, a in
           {"none": none, "simple": simple, "deep": deep}.items()}
    rec = {"status": "done", "result": {"acc": acc, "sizes": [32, 2048], "task": "add1", "P": 1}}
    (row,) = [r for r in paper_vs_lab({"sample_eff": rec}) if r["source"] == "[L] toy"]
    return row["verdict"]


@pytest.mark.parametrize("none, simple, deep, verdict", [
    ((0.3, 0.9), (0.8, 0.95), (0.0, 0.0), "reproduced"),
    ((1.0, 1.0), (1.0, 1.0), (0.0, 0.0), "no shared variant is ahead"),
    ((0.2, 0.2), (0.8, 0.9), (0.0, 0.0), "gap does not shrink"),
])
def test_sample_efficiency_row_explains_what_its_numbers_show(none, simple, deep, verdict):
    v = _sample_eff(none, simple, deep)
    assert verdict in v
    if verdict != "reproduced":
        assert v.startswith("differs")
