"""Analyses of a store (and an SAE): tables for the reports and the dashboard (docs/analysis.md)."""

from routesae.analyze.experts import ExpertStats, expert_tables
from routesae.analyze.features import count_interpretable, feature_tables
from routesae.analyze.run import AnalyzeConfig, analyze

__all__ = ["AnalyzeConfig", "ExpertStats", "analyze", "count_interpretable", "expert_tables", "feature_tables"]
