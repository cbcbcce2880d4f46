"""``routesae report RUN``: render ``RUN/analysis/`` as HTML, Markdown, CSV/Parquet tables and JSON.

Reads only the analysis folder (plus ``RUN/config.json``, ``RUN/eval.json`` and the routing keys of
``RUN/metrics.jsonl``); recomputes nothing.
Every file is written atomically; nothing is printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from routesae.atomic import atomic_write_text
from routesae.report.html import render_html
from routesae.report.load import load_analysis
from routesae.report.markdown import render_markdown
from routesae.report.neuronpedia import write_neuronpedia
from routesae.report.tables import summary_json, write_json, write_tables

FORMATS = ("html", "md", "csv", "json")
DEFAULT_FORMATS = FORMATS


@dataclass
class ReportConfig:
    """What to render. ``formats``: any of html (report.html), md (report.md), csv (tables/*.csv and
    tables/*.parquet), json (summary.json and neuronpedia/batch-N.json); a comma-separated string works too.
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


def build_report(cfg: ReportConfig) -> dict[str, Path]:
    """Write the report files; return {relative name: path} (e.g. ``report.html``, ``tables/latents.csv``)."""
    formats = cfg.resolved_formats()
    a = load_analysis(cfg.run)
    out = Path(cfg.out).expanduser() if cfg.out else a.run / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if "html" in formats:
        paths["report.html"] = out / "report.html"
        atomic_write_text(paths["report.html"], render_html(a, cfg.top_features))
    if "md" in formats:
        paths["report.md"] = out / "report.md"
        atomic_write_text(paths["report.md"], render_markdown(a, cfg.top_features))
    if "csv" in formats:
        paths.update(write_tables(a, out / "tables"))
    if "json" in formats:
        paths["summary.json"] = out / "summary.json"
        write_json(paths["summary.json"], summary_json(a, cfg.top_features))
        paths.update(write_neuronpedia(a, out / "neuronpedia", cfg.neuronpedia_batch))
    return paths
