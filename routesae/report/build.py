"""``routesae report RUN``: render ``RUN/analysis/`` as HTML, Markdown, CSV/Parquet tables, JSON and PDF;
``routesae report RUN RUN [...]``: a comparison report of runs trained on the same store.

Reads only the analysis folder (plus ``RUN/config.json``, ``RUN/eval.json`` and the routing keys of
``RUN/metrics.jsonl``); recomputes nothing. Every file is written atomically; nothing is printed
(a skipped PDF is reported through ``warn``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from routesae.atomic import atomic_write_text
from routesae.report.html import render_html
from routesae.report.load import load_analysis
from routesae.report.markdown import render_markdown
from routesae.report.neuronpedia import write_neuronpedia
from routesae.report.tables import summary_json, write_json, write_tables

FORMATS = ("html", "md", "csv", "json", "pdf")
DEFAULT_FORMATS = ("html", "md", "csv", "json")


@dataclass
class ReportConfig:
    """What to render. ``formats``: any of html (report.html), md (report.md), csv (tables/*.csv and
    tables/*.parquet), json (summary.json and neuronpedia/batch-N.json), pdf (report.pdf, printed from the HTML
    by headless Chromium; skipped without one); a comma-separated string works too.
    ``out``: default RUN/report. ``top_features``: latents shown in the HTML and Markdown reports.
    ``neuronpedia_batch``: features per Neuronpedia batch file."""

    run: str
    formats: tuple[str, ...] | list[str] | str = DEFAULT_FORMATS
    out: str | None = None
    top_features: int = 30
    neuronpedia_batch: int = 128

    def resolved_formats(self) -> tuple[str, ...]:
        fmts = self.formats.split(",") if isinstance(self.formats, str) else list(self.formats)
        fmts = [f.strip().lower() for f in fmts if f and f.strip()]
        bad = [f for f in fmts if f not in FORMATS]
        if bad or not fmts:
            raise ValueError(f"unknown report format {', '.join(bad) or '(none)'}; choose from {', '.join(FORMATS)}")
        if self.top_features < 0 or self.neuronpedia_batch < 1:
            raise ValueError(f"top_features={self.top_features} must be >= 0 and neuronpedia_batch="
                             f"{self.neuronpedia_batch} >= 1")
        return tuple(dict.fromkeys(fmts))


def _pdf(html_text: str, out: Path, warn: Callable[[str], None] | None) -> dict[str, Path]:
    """``out/report.pdf`` printed from ``html_text``; {} (and ``warn`` told why) without a Chromium."""
    from routesae.report.pdf import can_print, html_to_pdf

    why = can_print()
    if why:
        if warn:
            warn(why)
        return {}
    html_path = out / "report.html"
    if html_path.is_file() and html_path.read_text(encoding="utf-8") == html_text:
        return {"report.pdf": html_to_pdf(html_path, out / "report.pdf")}
    with tempfile.TemporaryDirectory(prefix="routesae-report-") as tmp:
        src = Path(tmp) / "report.html"
        src.write_text(html_text, encoding="utf-8")
        return {"report.pdf": html_to_pdf(src, out / "report.pdf")}


def build_report(cfg: ReportConfig, warn: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Write the report files; return {relative name: path} (e.g. ``report.html``, ``tables/latents.csv``).
    ``warn`` gets a one-line reason when a requested PDF is skipped (no Chromium)."""
    formats = cfg.resolved_formats()
    a = load_analysis(cfg.run)
    out = Path(cfg.out).expanduser() if cfg.out else a.run / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    html_text = render_html(a, cfg.top_features) if {"html", "pdf"} & set(formats) else ""
    if "html" in formats:
        paths["report.html"] = out / "report.html"
        atomic_write_text(paths["report.html"], html_text)
    if "md" in formats:
        paths["report.md"] = out / "report.md"
        atomic_write_text(paths["report.md"], render_markdown(a, cfg.top_features))
    if "csv" in formats:
        paths.update(write_tables(a, out / "tables"))
    if "json" in formats:
        paths["summary.json"] = out / "summary.json"
        write_json(paths["summary.json"], summary_json(a, cfg.top_features))
        paths.update(write_neuronpedia(a, out / "neuronpedia", cfg.neuronpedia_batch))
    if "pdf" in formats:
        paths.update(_pdf(html_text, out, warn))
    return paths


def default_comparison_out(runs: list[str | Path]) -> Path:
    """Where a comparison goes by default: ``comparison/`` beside the first run."""
    return Path(runs[0]).expanduser().parent / "comparison"


def build_comparison(runs: list[str | Path], formats: tuple[str, ...] | list[str] | str = DEFAULT_FORMATS,
                     out: str | Path | None = None, warn: Callable[[str], None] | None = None) -> dict[str, Path]:
    """The comparison report of ``runs`` (trained on the same store) in ``out`` (default: comparison/ beside the
    first run): report.html, report.md, comparison.json, tables/metrics.csv and tables/routed_layers.csv, and
    report.pdf when asked for."""
    from routesae.report import compare as C
    from routesae.report import compare_render as CR
    from routesae.report.tables import write_csv

    fmts = ReportConfig(run="", formats=formats).resolved_formats()
    infos = C.load_runs(list(runs))
    dest = Path(out).expanduser() if out else default_comparison_out(runs)
    dest.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    html_text = CR.render_comparison_html(infos) if {"html", "pdf"} & set(fmts) else ""
    if "html" in fmts:
        paths["report.html"] = dest / "report.html"
        atomic_write_text(paths["report.html"], html_text)
    if "md" in fmts:
        paths["report.md"] = dest / "report.md"
        atomic_write_text(paths["report.md"], CR.render_comparison_markdown(infos))
    if "csv" in fmts:
        for name, df in (("metrics", C.metrics_table(infos)), ("routed_layers", C.routed_layers_table(infos))):
            paths[f"tables/{name}.csv"] = dest / "tables" / f"{name}.csv"
            write_csv(df, paths[f"tables/{name}.csv"])
    if "json" in fmts:
        paths["comparison.json"] = dest / "comparison.json"
        write_json(paths["comparison.json"], CR.comparison_json(infos))
    if "pdf" in fmts:
        paths.update(_pdf(html_text, dest, warn))
    return paths
