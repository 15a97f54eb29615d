"""The [PT+] rows (study.experiments.prefix_plus): each criterion passes and fails on fake results,
the stages reuse E1 … E4's bases, and the report sections render with and without the [P] stages."""

import numpy as np
import pytest

from reports.experiments.prefix_plus import section
from study.experiments.prefix_plus import EXPERIMENTS, e1, e2, e3, e4, probes
from study.experiments.registry import REGISTRY

TASKS = ("ascending", "descending", "add1", "add2")


def acc(x: float, seeds: int = 1) -> dict:
    return {"mean": x, "std": 0.0, "values": [x] * seeds}


BASE_ACC = {"task": "mix4", "exact_acc": 0.93, "ceiling": 0.94, "of_ceiling": 0.99, "y1_given": True}
CURVE = [[10, 1.0, 0.1], [20, 0.5, 0.2]]


def e1_result(a: float, cos: float) -> dict:
    return {"experiment": "PT+E1", "params": {"plus": 9216, "plus_w1": 192}, "curves": {"plus": CURVE, "plus_w1": CURVE},
            "descending_acc": {"plus": acc(a), "plus_w1": acc(a)},
            "bias_cosine": {"mean": cos, "min": cos, "max": cos, "per_head": [[cos]]}}


def e2_result(low: float) -> dict:
    return {"experiment": "PT+E2", "params": 16384, "curves": {t: CURVE for t in TASKS}, "base_acc": BASE_ACC,
            "own_task_acc": {t: acc(0.9 if t != "add2" else low) for t in TASKS}}


def e3_result(pre: float, new: float) -> dict:
    return {"experiment": "PT+E3", "params": 16384, "curves": {t: CURVE for t in TASKS}, "base_acc": BASE_ACC,
            "acc": {**{t: acc(pre) for t in TASKS}, "ascending_add1": acc(new)}}


def e4_result(a: float) -> dict:
    return {"experiment": "PT+E4", "width": 6, "params": {"lora": 12288, "plus": 12288},
            "curves": {"plus": CURVE}, "double_hist_acc": {"plus": acc(a)}}


def probes_result(pattern: float, share_exponent: float) -> dict:
    layer = {"layer": 0, "pattern_max_abs_diff": pattern, "z_softmax_part_max_abs_diff": pattern,
             "out_residual_max_abs": 1e-7, "term_max_abs": 0.5, "out_moved_max_abs": 0.5}
    return {"experiment": "PT+probes", "model": "tiny", "note": "tiny",
            "identities": {"layers": [layer], "layer0_pattern_vs_base": 0.0},
            "dilution": {"model": "tiny", "lengths": [16, 32], "prefix_len": 1, "window": "last eighth",
                         "prefix_alpha": [[0.5, 0.25]], "memory_share": [[0.3, 0.3]],
                         "prefix_exponent": [1.0], "memory_exponent": [share_exponent]}}


def verdicts(rows: list[dict]) -> list[str]:
    return [r["verdict"].split(" (")[0] for r in rows]


@pytest.mark.parametrize("rows, good, bad", [
    (e1.rows, e1_result(0.02, 0.6), e1_result(0.40, 0.999)),
    (e2.rows, e2_result(0.80), e2_result(0.50)),
    (e3.rows, e3_result(0.95, 0.30), e3_result(0.60, 0.05)),
    (e4.rows, e4_result(0.40), e4_result(0.01)),
    (probes.rows, probes_result(0.0, 0.02), probes_result(1e-2, 0.9)),
])
def test_each_criterion_passes_and_fails(rows, good, bad):
    ok, no = rows(good), rows(bad)
    assert set(verdicts(ok)) == {"reproduced"}, ok
    assert set(verdicts(no)) == {"differs"}, no
    assert all(r["source"].startswith("[PT+] ") and "beyond [P]" in r["paper"] for r in ok)


def test_the_boundaries_are_the_written_criteria():
    """≤ 5 % on E1, min ≥ 75 % on E2, ≥ 90 % and ≥ 10 % on E3, > 5 % on E4: at the edges."""
    assert verdicts(e1.rows(e1_result(0.05, 0.5))[:2]) == ["reproduced"] * 2
    assert verdicts(e2.rows(e2_result(0.75))) == ["reproduced"]
    assert verdicts(e3.rows(e3_result(0.9, 0.1))) == ["reproduced"] * 2
    assert verdicts(e4.rows(e4_result(0.05))) == ["differs"]


def test_the_rows_report_seeds_as_the_other_rows():
    r = e4_result(0.4)
    r["double_hist_acc"]["plus"] = {"mean": 0.4, "std": 0.1, "values": [0.3, 0.4, 0.5]}
    assert "40.0 ± 10.0 %" in e4.rows(r)[0]["lab"]


def test_they_follow_every_paper_experiment_and_reuse_its_base(tmp_path):
    """After every existing experiment in the registry (no existing name or key moves), and no new base."""
    from study.stages import stages_for
    names = [e.name for e in REGISTRY]
    assert names[-len(EXPERIMENTS):] == [e.name for e in EXPERIMENTS]
    for scale in ("quick", "paper", "micro"):
        by = {s.name: s for s in stages_for(scale, tmp_path)}
        for e, paper in zip(EXPERIMENTS, ("E1", "E2", "E3", "E4")):
            assert by[e.name].needs == by[paper].needs
            assert by[e.name].config["recipe"] == by[paper].config["recipe"]
        assert not [n for n in by if n.startswith("base-PT+")]


@pytest.mark.parametrize("result, paper", [
    (e1_result(0.0, 0.5), {"E1": {"descending_acc": {"prefix_simple": acc(0.0)}}}),
    (e2_result(0.8), {"E2": {"own_task_acc": {t: acc(0.9) for t in TASKS}}}),
    (e3_result(0.95, 0.3), {"E3": {"acc": {t: acc(0.9) for t in TASKS}}}),
    (e4_result(0.4), {"E4": {"params": {"lora": 12288, "prefix": 12288}, "curves": {"lora": CURVE, "prefix": CURVE},
                             "double_hist_acc": {"lora": acc(0.9), "prefix": acc(0.01)}}}),
    (probes_result(0.0, 0.0), {}),
])
def test_the_sections_render_beside_the_paper_stage_or_alone(result, paper):
    records = {k: {"status": "done", "result": v} for k, v in paper.items()}
    for recs in (records, {}):
        title, items, intro = section(result, recs)
        assert title.startswith("[PT+]") and items and "φ(q)ᵀM" in intro
    if "E4" in paper:
        rows = section(result, records)[1][0].rows
        assert [r[0] for r in rows] == ["[PT+] width 6", "[P] E4 lora", "[P] E4 prefix"]


def test_the_dilution_figure_has_both_methods_per_layer():
    from reports.experiments.prefix_plus import dilution_figure
    fig = dilution_figure(probes_result(0.0, 0.0)["dilution"])
    assert [t.name for t in fig.data] == ["layer 0: prefix mass", "layer 0: [PT+] share"]
    assert np.allclose(fig.data[1].y, [0.3, 0.3])
