"""The bottom package prefixlab_common: one UserError, one Progress type, finite JSON, and the one
JS divergence the probes and the LLaMA checks report."""
import ast
import json
import math
from pathlib import Path

import pytest
import torch

import prefixlab_common
from prefixlab_common.attention import js_divergence
from prefixlab_common.errors import UserError
from prefixlab_common.jsonsafe import finite_json
from prefixlab_common.progress import Progress

ROOT = Path(__file__).resolve().parents[1]


def test_user_error_is_one_class_everywhere():
    import toy_models.training
    assert toy_models.training.Progress is Progress
    assert not (ROOT / "toy_models" / "errors.py").exists()  # no second home that re-exports it


def test_the_bottom_package_imports_nothing_of_the_project():
    project = {"toy_models", "tuning", "probes", "model_checks", "theory", "study", "reports", "cli"}
    for f in Path(prefixlab_common.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & project, (f.name, names)


def test_no_package_defines_its_own_user_error_or_progress_type():
    """UserError and the Progress callback type are defined once (cli's ProgressBar is a callable of it)."""
    found = []
    for pkg in ("toy_models", "tuning", "probes", "model_checks", "theory", "study", "reports"):
        for f in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(f.read_text())
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and node.name == "UserError":
                    found.append(f"{f.relative_to(ROOT)}: class UserError")
                if isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    if any(isinstance(t, ast.Name) and t.id == "Progress" for t in targets):
                        found.append(f"{f.relative_to(ROOT)}: Progress = ...")
    assert not found, found


def test_finite_json_nulls_what_is_not_finite_and_keeps_the_rest():
    obj = {"a": [1.5, float("nan"), (float("inf"), -float("inf"))], "b": 3, "c": "x", "d": None, "e": True}
    assert finite_json(obj) == {"a": [1.5, None, [None, None]], "b": 3, "c": "x", "d": None, "e": True}
    json.dumps(finite_json(obj), allow_nan=False)
    # a tensor (theory.reparam's records): its values as floats, NaN/inf as null, ints stay ints
    t = torch.tensor([0.25, float("nan"), float("inf"), 1e-30], dtype=torch.float64)
    assert finite_json(t) == [0.25, None, None, 1e-30]
    assert finite_json(torch.tensor([0.1], dtype=torch.float32)) == [float(torch.tensor(0.1, dtype=torch.float32))]
    assert finite_json(torch.tensor([[1, 2]])) == [[1, 2]]
    assert finite_json(torch.tensor(float("nan"))) is None


def _recorded_probes_form(p, q):  # what probes/invariance.py and probes/drift.py reported
    m = 0.5 * (p + q)
    kl = lambda a, b: (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)
    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0)


def _recorded_llama_form(p, q):  # what model_checks/identities.py reported
    p, q = p.clamp_min(0), q.clamp_min(0)
    m = (p + q) / 2
    kl = lambda a, b: torch.xlogy(a, a).sum(-1) - torch.xlogy(a, b).sum(-1)
    return (kl(p, m) + kl(q, m)) / 2


def test_the_one_js_divergence_keeps_the_probes_numbers_and_moves_the_checks_by_rounding_only():
    g = torch.Generator().manual_seed(0)
    for dtype, moved in ((torch.float32, 1e-6), (torch.float64, 1e-15)):
        p = torch.rand(64, 17, generator=g, dtype=dtype).softmax(-1)
        q = torch.rand(64, 17, generator=g, dtype=dtype).softmax(-1)
        q[0] = p[0]  # identical rows: 0, never negative
        js = js_divergence(p, q)
        assert torch.equal(js, _recorded_probes_form(p, q))  # the probes' numbers, bit for bit
        # the LLaMA checks' numbers move by rounding only (docs/architecture.md lists by how much)
        assert (js - _recorded_llama_form(p, q)).abs().max() <= moved
        assert js[0] == 0 and (js >= 0).all() and (js <= math.log(2) + 1e-6).all()
        assert js.dtype == dtype
    # a slightly negative input (a half-precision pattern cast up) is clamped: no NaN
    p = torch.tensor([[0.5, 0.5 + 1e-7, -1e-7]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    assert torch.equal(js_divergence(p, q), _recorded_probes_form(p.clamp_min(0), q))
    assert js_divergence(p, q).item() >= 0 and _recorded_probes_form(p, q).isnan().item()
    # disjoint supports: the maximum, log 2
    assert js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(math.log(2))


def test_every_module_that_reports_js_uses_the_one_form():
    import model_checks.identities as li
    import probes.drift as pd
    import probes.invariance as pi
    import prefixlab_common.attention as attention
    assert pi.js_divergence is js_divergence and pd.js_divergence is js_divergence
    assert li.js_divergence is js_divergence
    assert [n for n in dir(attention) if n.startswith("js_")] == ["js_divergence"]
