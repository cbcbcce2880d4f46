"""Reports of an analysed run: ``build_report`` (HTML, Markdown, tables, JSON, Neuronpedia export, PDF);
``build_comparison``: several runs trained on the same store side by side.

``load_analysis`` and ``routesae.report.figures`` are shared with the dashboard.
"""

from routesae.report.build import FORMATS, ReportConfig, build_comparison, build_report
from routesae.report.load import Analysis, load_analysis

__all__ = ["FORMATS", "Analysis", "ReportConfig", "build_comparison", "build_report", "load_analysis"]
