"""The bottom package prefixlab_common: one UserError (re-exported by toy_models.errors), one
Progress type, finite JSON, and the two forms of the JS divergence the probes and the LLaMA checks
report (kept apart: they differ in the last bits)."""
import ast
import json
import math
from pathlib import Path

import torch

import prefixlab_common
from prefixlab_common.attention import js_divergence, js_divergence_clamped_inputs
from prefixlab_common.errors import UserError
from prefixlab_common.jsonsafe import finite_json
from prefixlab_common.progress import Progress

ROOT = Path(__file__).resolve().parents[1]


def test_user_error_is_one_class_everywhere():
    import model_checks.identities
    import toy_models.errors
    import toy_models.training
    assert toy_models.errors.UserError is UserError  # back-compat re-export
    assert toy_models.training.Progress is Progress
    assert model_checks.identities.finite_json is finite_json


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


def _reference_probes(p, q):  # probes/invariance.py's form as it was recorded
    m = 0.5 * (p + q)
    kl = lambda a, b: (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)
    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0)


def _reference_llama(p, q):  # model_checks/identities.py's form as it was recorded
    p, q = p.clamp_min(0), q.clamp_min(0)
    m = (p + q) / 2
    kl = lambda a, b: torch.xlogy(a, a).sum(-1) - torch.xlogy(a, b).sum(-1)
    return (kl(p, m) + kl(q, m)) / 2


def test_both_js_forms_keep_their_numbers_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        p = torch.rand(64, 17, generator=g, dtype=dtype).softmax(-1)
        q = torch.rand(64, 17, generator=g, dtype=dtype).softmax(-1)
        q[0] = p[0]  # identical rows: 0, never negative in the probes' form
        assert torch.equal(js_divergence(p, q), _reference_probes(p, q))
        assert torch.equal(js_divergence_clamped_inputs(p, q), _reference_llama(p, q))
        assert js_divergence(p, q)[0] == 0 and (js_divergence(p, q) >= 0).all()
        assert torch.allclose(js_divergence(p, q), js_divergence_clamped_inputs(p, q), atol=1e-6)
        assert (js_divergence(p, q) <= math.log(2) + 1e-6).all()
    # a slightly negative input (a half-precision pattern cast up): only the LLaMA form clamps it
    p = torch.tensor([[0.5, 0.5 + 1e-7, -1e-7]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    assert torch.equal(js_divergence_clamped_inputs(p, q), _reference_llama(p, q))
    assert js_divergence(p, q).isnan().item() and js_divergence_clamped_inputs(p, q).item() >= 0


def test_the_modules_that_report_js_use_their_own_form():
    import model_checks.identities as li
    import probes.drift as pd
    import probes.invariance as pi
    assert pi.js_divergence is js_divergence and pd.js_divergence is js_divergence
    assert li.js_divergence is js_divergence_clamped_inputs
