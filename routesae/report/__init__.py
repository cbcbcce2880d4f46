"""Reports of an analysed run: ``build_report`` (HTML, Markdown, tables, JSON, Neuronpedia export).

``load_analysis`` and ``routesae.report.figures`` are shared with the dashboard.
"""

from routesae.report.build import FORMATS, ReportConfig, build_report
from routesae.report.load import Analysis, load_analysis

__all__ = ["FORMATS", "Analysis", "ReportConfig", "build_report", "load_analysis"]
