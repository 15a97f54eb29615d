"""A generated report in a real headless Chromium (Playwright's Python package driving the system
/usr/bin/chromium; no browser download): no JavaScript errors, every figure rendered, the
raw/renormalized toggle and the layer/head selectors change the heatmap, hostile tokens render as
text, the page is not blank. Also the PNG export through kaleido."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from reports.build import build_report
from reports.figures import decode_array
from tests.reports.test_reports import HOSTILE, make_tiny_runs
from toy_models.tasks import TaskSpec

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no headless browser: {CHROMIUM} is missing "
                       "(apt-get install chromium)"),
]


def decode_png(data: bytes) -> np.ndarray:
    """A tiny PNG reader (8-bit RGB/RGBA, not interlaced): [height, width, channels] uint8."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, f"unsupported PNG {hdr}"
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    out = bytearray(h * stride)
    prev = bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif f == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif f == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 255
        elif f == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out[y * stride:(y + 1) * stride] = line
        prev = line
    return np.frombuffer(bytes(out), dtype=np.uint8).reshape(h, w, bpp)


def distinct_colours(png: bytes) -> int:
    px = decode_png(png)[..., :3].reshape(-1, 3).astype(np.int64)
    return len(np.unique(px[:, 0] << 16 | px[:, 1] << 8 | px[:, 2]))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("browser")
    runs = make_tiny_runs(root / "runs")
    with pytest.MonkeyPatch.context() as mp:  # digit 2 becomes a hostile token everywhere
        mp.setattr(TaskSpec, "token_str",
                   lambda self, t: HOSTILE if t == 2 else ("S" if t == self.slot_token else str(t)))
        build_report([runs["full"], runs["prefix"], runs["prefix_asc"]], root / "report.html", n_inputs=16)
    torch.set_num_threads(n)
    return root / "report.html"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright's python package is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


ALL_RENDERED = """() => { const d = [...document.querySelectorAll('.plotly-graph-div')];
  return d.length > 0 && d.every(g => g.querySelector('.main-svg')); }"""


def test_report_renders_and_toggles(report, browser):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors, dialogs = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(report.resolve().as_uri())
    page.wait_for_function(ALL_RENDERED, timeout=30_000)

    # every figure div rendered a non-empty SVG
    sizes = page.evaluate("""() => [...document.querySelectorAll('.plotly-graph-div')].map(g => {
        const s = g.querySelector('.main-svg'); const r = s.getBoundingClientRect();
        return [g.id, s.childElementCount, r.width, r.height, g.querySelectorAll('.trace, .hm, image').length]; })""")
    assert len(sizes) == 5
    for div_id, children, w, h, marks in sizes:
        assert children > 0 and w > 100 and h > 100 and marks > 0, (div_id, children, w, h, marks)

    # hostile tokens are text: tick labels show them literally, nothing ran, no script was injected
    ticks = page.evaluate("() => [...document.querySelectorAll('#figure-1 .xtick text')].map(t => t.textContent)")
    assert HOSTILE in ticks
    assert page.evaluate("() => document.querySelectorAll('svg script, .plotly-graph-div script').length") == 0
    assert dialogs == []

    fig = page.locator("#figure-1")
    fig.scroll_into_view_if_needed()
    visible = "() => document.getElementById('figure-1').data.map(t => t.visible)"
    # z as the page holds it: plotly's typed-array spec until restyled, then arrays of rows
    z_js = """(i) => { const z = document.getElementById('figure-1').data[i].z;
        return z.bdata ? z : z.map(r => Array.from(r)); }"""

    def z_of(i):
        return decode_array(page.evaluate(z_js, i)).astype(float)

    n_traces = len(page.evaluate(visible))
    raw_before = z_of(0)
    shot_raw = fig.screenshot()

    # raw -> renormalized: the other trace set shows, and the picture changes
    page.locator("#figure-1 .updatemenu-button").filter(has_text="renormalized over content").click()
    page.wait_for_function("() => document.getElementById('figure-1').data[1].visible === true")
    assert page.evaluate(visible) == [i % 2 == 1 for i in range(n_traces)]
    shot_ren = fig.screenshot()
    assert shot_ren != shot_raw

    # head selector: the heatmaps now hold the stored pattern of (layer 0, head 1)
    page.locator("#figure-1 .updatemenu-header-group").filter(has_text="head 0").click()
    page.locator("#figure-1 .updatemenu-dropdown-button").filter(has_text="head 1").click()
    store = page.evaluate("() => document.getElementById('figure-1').layout.meta.prefixlab_attention")
    expected = decode_array(store["raw"][0][1][0])
    page.wait_for_function("() => !document.getElementById('figure-1').data[0].z.bdata")
    got = z_of(0)
    assert np.array_equal(got, expected.astype(float), equal_nan=True)
    assert not np.array_equal(got, raw_before, equal_nan=True)
    ren = z_of(1)
    assert np.array_equal(ren, decode_array(store["renormalized"][0][1][0]).astype(float), equal_nan=True)
    assert fig.screenshot() != shot_ren

    # not blank: many distinct colours on the figure and on the page
    assert distinct_colours(shot_raw) > 30
    page.evaluate("() => window.scrollTo(0, 0)")
    assert distinct_colours(page.screenshot()) > 30
    assert errors == [], errors
    page.close()


def test_png_export_through_kaleido(tmp_path, report):
    pytest.importorskip("kaleido", reason="kaleido is not installed")
    runs = report.parent / "runs"
    res = build_report([runs / "prefix"], tmp_path / "r.html", png_dir=tmp_path / "png", n_inputs=8)
    assert res["warnings"] == [], res["warnings"]
    assert len(res["png"]) == res["figures"] == 5
    for p in res["png"]:
        data = Path(p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert distinct_colours(Path(res["png"][0]).read_bytes()) > 30
