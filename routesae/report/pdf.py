"""``--format pdf``: the HTML report printed by headless Chromium (DevTools ``Page.printToPDF``).

The page is laid out for print (``@media print``: no navigation, a page break before every section,
figures never split) at the width A4 leaves at :data:`SCALE`, every plotly figure resized to that
layout before printing. Without a Chromium on PATH the PDF is skipped with a one-line reason.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from routesae.atomic import atomic_path
from routesae.browser import Browser, find_chromium

A4_WIDTH_IN, MARGIN_IN = 8.27, 12 / 25.4  # the CSS @page margin of the report (12 mm)
SCALE = 0.7  # printed at 70%: the page is laid out about 1000 CSS pixels wide, like a small browser window
NO_CHROMIUM = "skipped report.pdf: no Chromium on PATH (install one, e.g. apt-get install chromium, to print PDFs)"


def print_width(scale: float = SCALE) -> int:
    """The CSS width of the printed page's content at ``scale`` (96 CSS pixels per inch)."""
    return int((A4_WIDTH_IN - 2 * MARGIN_IN) * 96 / scale)


def can_print() -> str | None:
    """None when a PDF can be printed here, else the one-line reason it is skipped."""
    return None if find_chromium() else NO_CHROMIUM


def html_to_pdf(html_path: Path, pdf_path: Path, timeout: float = 120) -> Path:
    """Print ``html_path`` to ``pdf_path`` (atomically) with headless Chromium; return ``pdf_path``."""
    with tempfile.TemporaryDirectory(prefix="routesae-pdf-") as profile:
        browser = Browser(Path(profile))
        try:
            width = print_width()
            browser.open(Path(html_path).resolve().as_uri(), width=width, height=1400, timeout=timeout)
            browser.call("Emulation.setEmulatedMedia", browser.session, media="print")
            browser.plots_ready(timeout)
            time.sleep(0.3)  # let the resized figures paint
            with atomic_path(pdf_path) as tmp:
                browser.print_pdf(tmp, scale=SCALE)
        finally:
            browser.close()
    return Path(pdf_path)
