"""The HTML report as a colleague sees it: headless Chromium at 1000 and 1600 pixels and in print layout.

From element geometry (getBoundingClientRect of every plot container ``.fig``): no figure overlaps another,
none is wider than its section or cut on the right, the page never scrolls sideways, and every expert chart's
x-axis spans all experts (plotly's axis range and a visible tick label of the last expert). Screenshots and
the PDF go to tests/artifacts/ (git-ignored). A synthetic analysis with 32 experts per MoE layer, like the
demo MoE; a few top features keep it quick.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from routesae.browser import Browser, find_chromium
from routesae.report import ReportConfig, build_report
from routesae.report.pdf import html_to_pdf, print_width
from tests.analysis_fixture import make_analysis

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH (apt-get install -y chromium)")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
N_EXPERTS = 32
WIDTHS = (1000, 1600)

GEOMETRY = """(() => {
  const r = e => { const b = e.getBoundingClientRect();
    return [b.left + scrollX, b.top + scrollY, b.right + scrollX, b.bottom + scrollY]; };
  return {page: [document.documentElement.scrollWidth, window.innerWidth],
    figs: [...document.querySelectorAll('.fig')].map(f => {
      const g = f.querySelector('.js-plotly-plot'), L = g && g._fullLayout, x = L && L.xaxis;
      return {box: r(f), section: r(f.closest('section')), svg: g ? r(g.querySelector('.main-svg')) : null,
              title: L && L.title ? L.title.text : '', categories: x && x._categories ? x._categories.slice() : [],
              range: x ? x.range.slice() : null,
              ticks: g ? [...g.querySelectorAll('.xtick text')].map(t => [t.textContent, r(t)]) : []};
    })};
})()"""


def _overlap(a: list[float], b: list[float]) -> float:
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def check_geometry(g: dict, n_figures: int, where: str) -> int:
    """Assert the layout rules; return how many expert charts were checked."""
    figs = g["figs"]
    assert len(figs) == n_figures, where
    scroll, inner = g["page"]
    assert scroll <= inner + 1, f"{where}: the page scrolls sideways ({scroll} > {inner})"
    for i, f in enumerate(figs):
        box, sec, svg = f["box"], f["section"], f["svg"]
        assert box[2] - box[0] >= 250 and box[3] - box[1] >= 150, (where, f["title"], box)
        assert sec[0] - 1 <= box[0] and box[2] <= sec[2] + 1, f"{where}: {f['title']!r} leaves its section"
        assert svg and svg[2] <= box[2] + 1 and svg[0] >= box[0] - 1, f"{where}: {f['title']!r} is cut"
        for other in figs[i + 1:]:
            assert _overlap(box, other["box"]) <= 1, f"{where}: {f['title']!r} overlaps {other['title']!r}"
    experts = 0
    for f in figs:
        cats = f["categories"]
        if not cats or not all(re.fullmatch(r"E\d+", c) for c in cats):
            continue
        experts += 1
        last = f"E{N_EXPERTS - 1}"
        assert len(cats) == N_EXPERTS and cats[-1] == last, (where, f["title"], cats)
        lo, hi = f["range"]
        assert lo <= 0 - 0.4 and hi >= N_EXPERTS - 1 + 0.4, f"{where}: {f['title']!r} axis range {f['range']}"
        ticks = dict(f["ticks"])
        assert "E0" in ticks and last in ticks, f"{where}: {f['title']!r} tick labels {list(ticks)}"
        assert ticks[last][2] <= f["box"][2] + 1, f"{where}: {f['title']!r} cuts its last tick label"
    return experts


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    run = make_analysis(tmp_path_factory.mktemp("browser"), n_experts=N_EXPERTS)
    return build_report(ReportConfig(run=str(run), formats="html", top_features=2))["report.html"]


def test_figures_fit_at_common_widths_and_in_print(report, tmp_path):
    html = report.read_text()
    n_figures = html.count("<div class='fig")
    browser = Browser(tmp_path / "chrome")
    try:
        browser.open(report.as_uri(), width=WIDTHS[0])
        assert browser.plots_ready() == n_figures
        for width in WIDTHS:  # as a reader resizes the window: plotly's own responsive resize, nothing forced
            browser.set_size(width, 1000)
            time.sleep(2)
            browser.plots_ready(resize=False)
            experts = check_geometry(browser.js(GEOMETRY), n_figures, f"{width}px")
            assert experts >= 8  # heatmaps, load bars, load overview, co-activation
            browser.screenshot(ARTIFACTS / f"report-{width}.png", width, 1000, full_page=True)
        browser.call("Emulation.setEmulatedMedia", browser.session, media="print")
        browser.set_size(print_width(), 1400)
        browser.plots_ready()
        check_geometry(browser.js(GEOMETRY), n_figures, "print")
        assert browser.js("getComputedStyle(document.querySelector('nav')).display") == "none"
        assert browser.js("getComputedStyle(document.getElementById('evaluation')).breakBefore") == "page"
    finally:
        browser.close()


def test_pdf_is_printed(report):
    pdf = html_to_pdf(report, ARTIFACTS / "report.pdf")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 50_000
    assert len(re.findall(rb"/Type\s*/Page[^s]", data)) >= 6  # a page break before every long section
