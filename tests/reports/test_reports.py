"""Report figures hold exactly the probes' tensors; every token is escaped; the HTML is one
self-contained file with plotly.js inlined once; bad inputs are one-line UserErrors."""

import math
import re
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from plotly.offline import get_plotlyjs

from probes.clusters import activation_clusters
from probes.common import paired_forwards
from probes.invariance import attention_invariance
from reports.build import build_report
from reports.figures import (META_KEY, ZERO_FLOOR, AttentionPanel, accuracy_figure, attention_figure,
                             clusters_figure, decode_array, escape_token, invariance_figure,
                             learning_curves_figure, renormalized_pattern, stored_attention)
from reports.html import Pre, Raw, Section, Table, render_report, write_figure_html, write_report
from tests.conftest import micro_model
from prefixlab_common.errors import UserError
from toy_models.pretraining import pretrain
from toy_models.tasks import TaskSpec
from toy_models.training import TrainConfig
from tuning import make_method
from tuning.pipeline import finetune

SPEC = TaskSpec(length=4, num_digits=4, prompt_len=3)
HOSTILE = "<script>alert(1)</script>"
PLOTLY_HEADER = get_plotlyjs()[:200]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: micro models run ~8x faster on 1 thread


def make_tiny_runs(root: Path) -> dict[str, Path]:
    """A micro base (add1) and three tuned runs of it; accuracy does not matter here."""
    base = root / "base"
    pretrain(base, "add1", "micro", SPEC, TrainConfig(steps=40, batch_size=16, lr=1e-2, warmup=5,
                                                      eval_every=20, eval_size=32))
    tr = {"steps": 6, "batch_size": 8, "eval_every": 3, "eval_size": 16, "warmup": 1}
    finetune(base, "full", "add2", root / "full", {}, tr)
    finetune(base, "prefix", "add2", root / "prefix", {"length": 2}, tr)
    finetune(base, "prefix", "ascending", root / "prefix_asc", {"length": 3, "depth": "shallow"}, tr)
    return {"base": base, "full": root / "full", "prefix": root / "prefix", "prefix_asc": root / "prefix_asc"}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, one_thread):
    return make_tiny_runs(tmp_path_factory.mktemp("report_runs"))


@pytest.fixture
def prefixed(spec):
    """A 2-layer micro model, a random prefix and a few inputs."""
    model = micro_model(spec, n_layers=2)
    g = torch.Generator().manual_seed(0)
    state = make_method("prefix", model, length=2, generator=g).state()
    tokens = torch.randint(0, spec.slot_token, (5, spec.content_len), generator=g)
    return model, state, tokens


def _panel_from_cache(cache, names, spec, tokens, title="prefix", n_pre=2):
    pattern = torch.stack([cache[n][0] for n in names])
    labels = [spec.token_str(int(t)) for t in tokens[0]]
    return AttentionPanel(title, pattern, n_pre, 0, labels, prompt_len=spec.length)


# --------------------------------------------------------------------------------------------
# Figure builders: the data in the figure are the probe's tensors.


def test_attention_heatmap_z_is_the_hook_pattern(prefixed, spec):
    model, state, tokens = prefixed
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    pair = next(paired_forwards(model, state, tokens[:1], names))
    base = AttentionPanel("base", torch.stack([pair.base[n][0] for n in names]), 0, 0,
                          [spec.token_str(int(t)) for t in tokens[0]], prompt_len=spec.length)
    pre = _panel_from_cache(pair.method, names, spec, tokens)
    fig = attention_figure([base, pre], layer=1, head=1)
    # the visible traces at build time show (layer 1, head 1)
    assert np.array_equal(fig.data[0].z, pair.base[names[1]][0, 1].numpy())
    assert np.array_equal(fig.data[2].z, pair.method[names[1]][0, 1].numpy())
    for l, n in enumerate(names):
        for h in range(model.cfg.n_heads):
            assert np.array_equal(stored_attention(fig, 0, l, h), pair.base[n][0, h].numpy())
            assert np.array_equal(stored_attention(fig, 1, l, h), pair.method[n][0, h].numpy())
            renorm, _, A = pair.renormalized(l)
            got = stored_attention(fig, 1, l, h, "renormalized")
            assert np.isnan(got[:, :2]).all()  # prefix columns are not part of the content view
            assert np.allclose(got[:, 2:], renorm[0, h].numpy(), atol=1e-6)
    # at layer 0 the renormalized prefix view is the base pattern (docs/papers.md §4)
    assert np.allclose(stored_attention(fig, 1, 0, 0, "renormalized")[:, 2:], stored_attention(fig, 0, 0, 0),
                       atol=1e-5)
    meta = fig.layout.meta[META_KEY]
    assert meta["raw_traces"] == [0, 2] and meta["renormalized_traces"] == [1, 3]
    assert [t.visible for t in fig.data] == [True, False, True, False]
    # prefix keys are labelled P1, P2 and boxed
    assert list(fig.layout.xaxis2.ticktext[:2]) == ["P1", "P2"]
    assert any(s.type == "rect" and s.xref == "x2" for s in fig.layout.shapes)
    # toggles and selectors
    menus = fig.layout.updatemenus
    assert [b.label for b in menus[0].buttons] == ["raw", "renormalized over content"]
    assert len(menus[1].buttons) == model.cfg.n_layers and len(menus[2].buttons) == model.cfg.n_heads


def test_attention_figure_crops_long_inputs_and_rejects_bad_shapes():
    T, P = 100, 3
    pat = torch.rand(1, 2, T, P + T)
    panel = AttentionPanel("long", pat, P, 0, [str(i % 10) for i in range(T)])
    fig = attention_figure([panel], max_tokens=20)
    z = stored_attention(fig, 0, 0, 1)
    assert z.shape == (20, P + 20)
    assert np.array_equal(z, pat[0, 1, :20][:, list(range(P)) + list(range(P, P + 20))].numpy())
    fig = attention_figure([panel], window=(50, 60))
    assert np.array_equal(stored_attention(fig, 0, 0, 0), pat[0, 0, 50:60][:, [0, 1, 2, *range(P + 50, P + 60)]].numpy())
    with pytest.raises(UserError):
        AttentionPanel("bad", pat, P + 1, 0, ["a"] * T)
    with pytest.raises(UserError):
        attention_figure([panel], layer=3)


def test_renormalized_pattern_rows_sum_to_one():
    pat = torch.softmax(torch.randn(2, 3, 5, 7), -1)
    r = renormalized_pattern(pat, 2)
    assert torch.isnan(r[..., :2]).all()
    assert torch.allclose(r[..., 2:].sum(-1), torch.ones(2, 3, 5))


def test_invariance_heatmap_is_max_abs_diff(prefixed):
    model, state, tokens = prefixed
    inv_prefix = attention_invariance(model, state, tokens)
    with torch.no_grad():
        full = make_method("full", model)
        for p in full.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    inv_full = attention_invariance(model, full.state(), tokens)
    fig = invariance_figure({"prefix": inv_prefix, "full": inv_full})
    for trace, inv in zip(fig.data, (inv_prefix, inv_full)):
        d = inv.max_abs_diff.double().numpy()
        assert np.array_equal(np.asarray(trace.customdata), d)
        assert np.allclose(trace.z, np.log10(np.maximum(d, ZERO_FLOOR)))
    # layer 0: the prefix sits within tolerance, full fine-tuning far above it
    assert fig.data[0].z[0].max() <= math.log10(inv_prefix.tol)
    assert fig.data[1].z[0].min() > math.log10(1e-3)
    # an exact zero is labelled "0" and sits at the bottom of the colour scale
    zero = invariance_figure({"exact": type(inv_prefix)(**{**inv_prefix.__dict__,
                                                           "max_abs_diff": torch.zeros(2, 2)})})
    assert zero.data[0].text[0][0] == "0" and zero.data[0].z[0][0] == math.log10(ZERO_FLOOR)


def test_clusters_figure_plots_the_pca_points(spec):
    model = micro_model(spec)
    g = torch.Generator().manual_seed(0)
    states = {t: make_method("prefix", model, length=2, generator=g).state() for t in ("add1", "add2")}
    tokens = torch.randint(0, spec.slot_token, (12, spec.content_len), generator=g)
    c = activation_clusters(model, states, tokens, position=spec.length - 1)
    fig = clusters_figure(c, ["add1", "add2"], ["prefix", "prefix"])
    assert np.allclose(fig.data[0].x, c.pca[0, :, 0].numpy()) and np.allclose(fig.data[0].y, c.pca[0, :, 1].numpy())
    for i in range(2):
        lines, pts = fig.data[1 + 2 * i], fig.data[2 + 2 * i]
        assert np.allclose(pts.x, c.pca[i + 1, :, 0].numpy()) and np.allclose(pts.y, c.pca[i + 1, :, 1].numpy())
        assert np.allclose(np.asarray(lines.x)[1::3], c.pca[i + 1, :, 0].numpy())  # line ends at the method point
        assert lines.line.color == pts.marker.color  # coloured by task


def test_accuracy_and_learning_curves():
    m = {"base": {"add1": 1.0, "add2": 0.0}, "prefix": {"add1": 0.25, "add2": 0.5}}
    fig = accuracy_figure(m)
    assert np.array_equal(fig.data[0].z, [[1.0, 0.0], [0.25, 0.5]])
    assert fig.data[0].text[1][0] == "25.0%"
    rows = [{"step": 10, "exact_acc": 0.1, "loss": 2.0}, {"step": 20, "exact_acc": 0.4, "loss": 1.0}]
    fig = learning_curves_figure({"a": rows})
    assert list(fig.data[0].x) == [10, 20] and list(fig.data[0].y) == [0.1, 0.4] and list(fig.data[1].y) == [2.0, 1.0]


# --------------------------------------------------------------------------------------------
# Escaping and assembly.


def test_escape_token():
    assert escape_token(HOSTILE) == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert escape_token("a&b") == "a&amp;b" and escape_token(3) == "3"


def test_hostile_tokens_never_reach_the_html_unescaped():
    pat = torch.softmax(torch.randn(1, 1, 3, 4), -1)
    panel = AttentionPanel(HOSTILE, pat, 1, 0, [HOSTILE, "&", "<b>"], prompt_len=2)
    fig = attention_figure([panel], title=HOSTILE)
    assert "&lt;script&gt;" in fig.layout.xaxis.ticktext[1]
    assert HOSTILE not in fig.data[0].text[0][1] and "&lt;b&gt;" in fig.data[0].text[2][2]
    doc, figs = render_report(HOSTILE, [
        Section(HOSTILE, [fig, Table([HOSTILE], [[HOSTILE]], caption=HOSTILE), Pre(HOSTILE, summary=HOSTILE),
                          HOSTILE], intro=HOSTILE),
        (HOSTILE, accuracy_figure({HOSTILE: {HOSTILE: 0.5}}))])
    assert HOSTILE not in doc and "<b>" not in doc.split("</head>", 1)[1]
    assert doc.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 6  # title, heading, table, pre, text...
    assert len(figs) == 2


def test_plotlyjs_inlined_once_and_extra_sections():
    figs = [go.Figure(go.Scatter(x=[1, 2], y=[3, 4])) for _ in range(3)]
    doc, _ = render_report("t", [("figs", figs), ("table", Table(["paper", "lab"], [[0.849, 0.9]])),
                                 ("raw", Raw("<em>trusted</em>"))])
    assert doc.count(PLOTLY_HEADER) == 1 and doc.count(get_plotlyjs()) == 1
    assert doc.count("Plotly.newPlot(") == 3
    assert "<em>trusted</em>" in doc and "<td>0.849</td>" in doc
    assert re.search(r'<script[^>]*src=', doc) is None  # nothing is fetched from outside
    with pytest.raises(UserError):
        render_report("t", [("bad", object())])
    with pytest.raises(UserError):
        render_report("t", [42])


def test_write_report_is_atomic_and_refuses_a_directory(tmp_path):
    write_report(tmp_path / "sub" / "r.html", "<html></html>")
    assert (tmp_path / "sub" / "r.html").read_text() == "<html></html>"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.html"]  # no temporary left behind
    with pytest.raises(UserError, match="is a directory"):
        write_report(tmp_path, "x")


# --------------------------------------------------------------------------------------------
# build_report on real (tiny) runs.


def test_build_report_end_to_end(tiny_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(TaskSpec, "token_str",
                        lambda self, t: HOSTILE if t == 2 else ("S" if t == self.slot_token else str(t)))
    paper = Table(["experiment", "paper", "lab"], [["E1 full FT on descending", "84.9 %", "80.0 %"]])
    extra_fig = go.Figure(go.Bar(x=["a"], y=[1]))
    out = tmp_path / "report.html"
    res = build_report([tiny_runs["full"], tiny_runs["prefix"], tiny_runs["prefix_asc"]], out, n_inputs=24,
                       extra_sections=[("Paper vs lab", [paper, extra_fig], "E1 headline")])
    doc = out.read_text()
    assert res["out"] == str(out) and res["bytes"] == len(doc.encode()) and res["warnings"] == []
    assert res["runs"][0] == "base"  # the base run is added as the reference
    assert res["sections"] == ["Overview", "Paper vs lab", "Attention patterns", "Attention invariance",
                               "Bias and activation clusters", "Accuracy", "Provenance"]
    assert res["figures"] == 6
    assert doc.count(PLOTLY_HEADER) == 1
    assert HOSTILE not in doc
    # every occurrence of the token is the escaped one (inside plotly's JSON, '/' is \u002f)
    assert doc.count("alert(1)") > 0 and doc.count("alert(1)") == doc.count("&lt;script&gt;alert(1)")
    assert "84.9 %" in doc and "E1 headline" in doc
    # provenance: each run's config as escaped JSON
    assert doc.count("config.json and provenance.json") == 4
    assert "&quot;kind&quot;: &quot;finetune&quot;" in doc
    assert not [p for p in tmp_path.iterdir() if p.name != "report.html"]


def test_build_report_png_without_a_browser_warns_and_still_writes(tiny_runs, tmp_path, monkeypatch):
    import plotly.io as pio

    def no_browser(*a, **k):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.\nSecond line")
    monkeypatch.setattr(pio, "write_images", no_browser)
    res = build_report([tiny_runs["base"]], tmp_path / "r.html", png_dir=tmp_path / "png", n_inputs=8)
    assert (tmp_path / "r.html").is_file()
    assert len(res["warnings"]) == 1 and "\n" not in res["warnings"][0] and "PNG export skipped" in res["warnings"][0]
    assert res["png"] == []
    assert res["sections"] == ["Overview", "Attention patterns", "Accuracy", "Provenance"]  # base only


def test_build_report_user_errors(tiny_runs, tmp_path):
    with pytest.raises(UserError, match="no runs"):
        build_report([], tmp_path / "r.html")
    with pytest.raises(UserError, match="is a directory"):
        build_report([tiny_runs["prefix"]], tmp_path)
    with pytest.raises(UserError, match="no run at"):
        build_report([tmp_path / "missing"], tmp_path / "r.html")
    with pytest.raises(UserError, match="positive"):
        build_report([tiny_runs["prefix"]], tmp_path / "r.html", n_inputs=0)
    with pytest.raises(UserError, match="section"):
        build_report([tiny_runs["prefix"]], tmp_path / "r.html", extra_sections=[42])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="PNG directory"):
        build_report([tiny_runs["prefix"]], tmp_path / "r.html", png_dir=tmp_path / "file")
    assert not (tmp_path / "r.html").exists()


def test_write_figure_html(tmp_path):
    fig = accuracy_figure({HOSTILE: {"add1": 1.0}}, title=HOSTILE)
    out = write_figure_html(fig, tmp_path / "fig.html")
    doc = out.read_text()
    assert doc.count(PLOTLY_HEADER) == 1 and doc.count("Plotly.newPlot(") == 1 and HOSTILE not in doc
    assert "<title>&lt;script&gt;alert(1)&lt;/script&gt;</title>" in doc
