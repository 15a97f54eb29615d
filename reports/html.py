"""Assembling one self-contained HTML report.

plotly.js is inlined once in <head>, so the file opens offline and can be mailed; every figure is
added as a div + `Plotly.newPlot` call without the library. A report is a list of `Section`s; a
section holds items, each one of:

    go.Figure     a plotly figure
    Table         columns + rows (every cell HTML-escaped)
    Pre           preformatted text (escaped), e.g. a config as JSON
    Raw           trusted HTML, inserted as is (the caller vouches for it)
    str           a paragraph of plain text (escaped)

Nothing here prints; `write_report` writes atomically (toy_models.runs.atomic_write).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from prefixlab_common.errors import UserError
from toy_models.runs import write_text
# Lazy import: plotly.io, only to export PNGs (it needs kaleido, an optional extra).


@dataclass(frozen=True)
class Raw:
    """Trusted HTML, inserted unescaped."""

    html: str


@dataclass(frozen=True)
class Pre:
    """Preformatted text, escaped, optionally folded under a <details> summary."""

    text: str
    summary: str | None = None


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str | None = None


@dataclass
class Section:
    title: str
    items: list[Any] = field(default_factory=list)
    intro: str = ""  # plain text, escaped


Item = go.Figure | Table | Pre | Raw | str


def as_section(obj) -> Section:
    """A Section, or a (title, item) / (title, [items]) / (title, item, intro) tuple."""
    if isinstance(obj, Section):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) in (2, 3) and isinstance(obj[0], str):
        items = obj[1] if isinstance(obj[1], (list, tuple)) else [obj[1]]
        return Section(obj[0], list(items), obj[2] if len(obj) == 3 else "")
    raise UserError(f"a report section must be a Section or a (title, figure/table/html) pair, "
                    f"got {type(obj).__name__}")


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def _cell(v) -> str:
    if isinstance(v, Raw):
        return v.html
    if isinstance(v, float):
        return esc(f"{v:.4g}")
    if v is None:
        return "&ndash;"
    return esc(v)


def render_table(t: Table) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in t.rows)
    cap = f"<caption>{esc(t.caption)}</caption>" if t.caption else ""
    return f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def render_pre(p: Pre) -> str:
    pre = f"<pre>{esc(p.text)}</pre>"
    return f"<details><summary>{esc(p.summary)}</summary>{pre}</details>" if p.summary else pre


# Wires the layer and head dropdowns of attention figures (reports/figures.py) to the heatmaps:
# the store in layout.meta holds float32 base64 arrays, decoded once on first use.
ATTENTION_JS = r"""
window.prefixlabInit = function (gd) {
  if (!gd || !gd.layout || !gd.layout.meta || !gd.layout.meta.prefixlab_attention) return;
  var m = gd.layout.meta.prefixlab_attention;
  var cache = {};
  function decode(spec) {
    var bin = atob(spec.bdata), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var f = new Float32Array(bytes.buffer), shape = spec.shape.split(',').map(Number), rows = [];
    for (var r = 0; r < shape[0]; r++) rows.push(Array.from(f.subarray(r * shape[1], (r + 1) * shape[1])));
    return rows;
  }
  function zs(view, l, h) {
    var key = view + ':' + l + ':' + h;
    if (!cache[key]) cache[key] = m[view][l][h].map(decode);
    return cache[key];
  }
  var state = {layer: gd.layout.updatemenus[m.layer_menu].active || 0,
               head: gd.layout.updatemenus[m.head_menu].active || 0};
  gd.prefixlabShow = function (layer, head) {
    state.layer = layer; state.head = head;
    var z = zs('raw', layer, head).concat(zs('renormalized', layer, head));
    return Plotly.restyle(gd, {z: z}, m.raw_traces.concat(m.renormalized_traces));
  };
  gd.on('plotly_buttonclicked', function (ev) {
    var i = ev.menu._index;
    if (i === m.layer_menu) gd.prefixlabShow(ev.active, state.head);
    else if (i === m.head_menu) gd.prefixlabShow(state.layer, ev.active);
  });
};
"""

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 0 24px 48px; color: #222; line-height: 1.45; }
header { border-bottom: 1px solid #ddd; margin-bottom: 8px; }
h1 { font-size: 1.6em; margin: 20px 0 4px; } h2 { font-size: 1.3em; margin-top: 36px;
  border-bottom: 1px solid #eee; padding-bottom: 4px; }
nav ol { columns: 2; font-size: 0.95em; } .meta { color: #666; font-size: 0.9em; }
.figure { margin: 12px 0 24px; } .table-wrap { overflow-x: auto; }
table { border-collapse: collapse; margin: 10px 0 18px; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } caption { caption-side: top; text-align: left; color: #555; padding: 4px 0; }
pre { background: #f7f7f7; border: 1px solid #e3e3e3; padding: 8px; overflow-x: auto; font-size: 0.85em; }
details summary { cursor: pointer; margin: 4px 0; } .warning { color: #a04000; }
"""

PLOT_CONFIG = {"responsive": True, "displaylogo": False,
               "toImageButtonOptions": {"format": "png", "scale": 2}}


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "section"


class _Renderer:
    def __init__(self):
        self.n_fig = 0
        self.section = ""
        self.figures: list[tuple[str, go.Figure]] = []  # (file stem, figure)

    def item(self, it) -> str:
        if isinstance(it, go.Figure):
            self.n_fig += 1
            div_id = f"figure-{self.n_fig}"
            self.figures.append((f"{self.n_fig:02d}-{_slug(self.section)}", it))
            height = it.layout.height or 450
            body = it.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG,
                              default_height=f"{height}px", default_width="100%",
                              post_script="prefixlabInit(document.getElementById('{plot_id}'));")
            return f'<div class="figure">{body}</div>'
        if isinstance(it, Table):
            return render_table(it)
        if isinstance(it, Pre):
            return render_pre(it)
        if isinstance(it, Raw):
            return it.html
        if isinstance(it, str):
            return f"<p>{esc(it)}</p>"
        raise UserError(f"cannot put a {type(it).__name__} in a report: use a plotly figure, Table, Pre, "
                        f"Raw or str")


def render_report(title: str, sections: list, subtitle: str = "") -> tuple[str, list[tuple[str, go.Figure]]]:
    """The whole HTML document, and the figures it holds (file stem, figure) in order."""
    r = _Renderer()
    secs = [as_section(s) for s in sections]
    ids, used = [], set()
    for s in secs:
        base = _slug(s.title)
        sid, n = base, 1
        while sid in used:
            n += 1
            sid = f"{base}-{n}"
        used.add(sid)
        ids.append(sid)
    toc = "".join(f'<li><a href="#{sid}">{esc(s.title)}</a></li>' for sid, s in zip(ids, secs))
    body = []
    for sid, s in zip(ids, secs):
        r.section = s.title
        parts = [f'<section id="{sid}"><h2>{esc(s.title)}</h2>']
        if s.intro:
            parts.append(f"<p>{esc(s.intro)}</p>")
        parts.extend(r.item(it) for it in s.items)
        parts.append("</section>")
        body.append("\n".join(parts))
    doc = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
<script type="text/javascript">{ATTENTION_JS}</script>
</head>
<body>
<header><h1>{esc(title)}</h1><p class="meta">{esc(subtitle)}</p>
<nav><ol>{toc}</ol></nav></header>
{chr(10).join(body)}
</body>
</html>
"""
    return doc, r.figures


def check_output(out: Path) -> Path:
    out = Path(out)
    if out.is_dir():
        raise UserError(f"the report output {out} is a directory; give a file name such as {out / 'report.html'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"cannot write {out}: {out.parent} is not a directory")
    return out


def write_report(out: Path, text: str) -> None:
    """Write atomically (the run store's `atomic_write`); a folder that cannot be made or
    written is a one-line UserError."""
    out = check_output(out)
    try:
        write_text(out, text)
    except OSError as e:
        raise UserError(f"cannot write the report to {out} ({e.strerror})") from None


def png_export_unavailable() -> str | None:
    """Why PNG export cannot run on this machine (no kaleido, or no Chrome/Chromium for it to drive),
    in one line; None where it can. Checked before anything is written."""
    try:
        import kaleido  # noqa: F401
        from choreographer.browsers.chromium import Chromium  # kaleido's browser finder, only for --png
    except ImportError:
        return "--png needs kaleido: pip install -c constraints.txt kaleido (and a Chromium: make browser)"
    try:
        found = Chromium.find_browser(skip_local=False)
    except Exception:  # choreographer's search is best effort; treat a failure as not found
        found = None
    if not found:
        return ("--png needs a Chrome/Chromium browser and none was found: run `make browser` "
                "(or set BROWSER_PATH to one); nothing was written")
    return None


def export_pngs(figures: list[tuple[str, go.Figure]], png_dir: Path, scale: float = 1.0) -> tuple[list[Path], str | None]:
    """Each figure as PNG through kaleido (which drives a Chrome/Chromium). Returns the files
    written and, when no browser or kaleido is available, a one-line warning instead."""
    png_dir = Path(png_dir)
    if png_dir.exists() and not png_dir.is_dir():
        raise UserError(f"the PNG directory {png_dir} exists and is not a directory")
    if not figures:
        return [], None
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return [], "PNG export skipped: kaleido is not installed (pip install kaleido; it also needs Chromium)"
    import plotly.io as pio
    png_dir.mkdir(parents=True, exist_ok=True)
    paths = [png_dir / f"{stem}.png" for stem, _ in figures]
    try:
        pio.write_images([f for _, f in figures], paths, format="png", scale=scale,
                         width=[max(1100, f.layout.width or 0) for _, f in figures],
                         height=[f.layout.height or 500 for _, f in figures])
    except Exception as e:  # kaleido raises several types when Chrome is missing or fails
        msg = " ".join(str(e).split())[:160]
        return [p for p in paths if p.exists()], (f"PNG export skipped: kaleido could not render with a "
                                                  f"Chrome/Chromium browser ({type(e).__name__}: {msg}); "
                                                  f"install chromium or set BROWSER_PATH")
    return paths, None


def write_figure_html(fig: go.Figure, out: Path, title: str | None = None) -> Path:
    """One figure as its own self-contained HTML file (plotly.js inlined once), written atomically."""
    text = title or (fig.layout.title.text if fig.layout.title and fig.layout.title.text else "prefixlab figure")
    text = re.sub(r"<[^>]*>", " ", text)  # plotly titles may hold <br>/<sup>; the page title is plain text
    text = html.unescape(" ".join(text.split()))  # figure titles are already escaped; esc() re-escapes
    doc, _ = render_report(text, [Section(text, [fig])])
    write_report(Path(out), doc)
    return Path(out)
