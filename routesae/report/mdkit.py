"""Building blocks of the Markdown reports: escaping, tables with human headers, findings, glossary.

Every value from a run goes through :func:`md`: Markdown punctuation backslash-escaped (backslash,
backtick, ``|``, ``*``, ``_``, ``[``, ``]``, ``#``, ``~``), then HTML-escaped (``&`` ``<`` ``>``; in that
order so no escape breaks an entity), newlines shown as ``↵``: corpus text renders literally and cannot
break a table or inject HTML. The report's own links point at its headings only (``#anchor``).
"""

from __future__ import annotations

import html
import re
from typing import Any

import pandas as pd

from routesae.report import facts
from routesae.report import glossary as G
from routesae.report.findings import Finding, Ref
from routesae.report.load import scalar

_MD_SPECIAL = re.compile(r"([\\`|*_\[\]#~])")


def md(v: Any) -> str:
    """Escape any value for Markdown text or a table cell."""
    s = facts.num(v) if not isinstance(v, str) else v
    s = s.replace("\r", "").replace("\n", "↵").replace("\t", "→")
    return html.escape(_MD_SPECIAL.sub(r"\\\1", s), quote=False)


def slug(title: str) -> str:
    """The anchor a code-hosting site gives a heading (GitHub's rule for plain words)."""
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def md_table(df: pd.DataFrame, columns: list[str] | None = None, digits: int = 4) -> str:
    """A plain table (raw column names, values to ``digits`` significant figures)."""
    if df is None or df.empty:
        return "_no rows_\n"
    cols = [c for c in (columns or list(df.columns)) if c in df.columns]
    lines = ["| " + " | ".join(md(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in df[cols].itertuples(index=False):
        lines.append("| " + " | ".join(md(facts.num(v, digits)) for v in row) + " |")
    return "\n".join(lines) + "\n"


class MdPage:
    """Renders Markdown tables and findings of one report; remembers the metric terms shown (for the glossary)."""

    def __init__(self) -> None:
        self.terms: list[str] = []

    def use(self, key: str) -> str:
        """Record a term; return its name."""
        if key not in self.terms:
            self.terms.append(key)
        return G.TERMS[key].name

    def table(self, df: pd.DataFrame | None, columns: list[str] | None = None, top: int | None = None,
              source: str | None = None, value_term: str | None = None) -> str:
        """Human headers, values in their units; more than ``top`` rows: the first ``top`` and where the rest are.
        ``value_term``: the unit of columns that are neither metrics nor identifiers (one column per run)."""
        if df is None or df.empty:
            return "_no rows_\n"
        cols = [c for c in (columns or list(df.columns)) if c in df.columns]
        keys = {c: (G.term_for(c) or (None,))[0] or (value_term if c not in G.PLAIN else None) for c in cols}
        for k in keys.values():
            if k:
                self.use(k)
        shown = df if top is None else df.head(top)
        lines = ["| " + " | ".join(md(G.label(c)) for c in cols) + " |", "|" + "---|" * len(cols)]
        for row in shown[cols].itertuples(index=False):
            lines.append("| " + " | ".join(md(G.fmt(keys[c], v) if keys[c] else facts.num(scalar(v), 4))
                                           for c, v in zip(cols, row)) + " |")
        more = len(df) - len(shown)
        tail = (f"\n_{more:,} more rows" + (f" in `{md(source)}`" if source else "") + "_\n") if more > 0 else ""
        return "\n".join(lines) + "\n" + tail

    def metrics(self, rows: list[tuple[str, list[Any]]], headers: list[str]) -> str:
        """Metrics as rows: the term's name, then one value per column in the term's unit."""
        lines = ["| Metric | " + " | ".join(md(h) for h in headers) + " |", "|" + "---|" * (len(headers) + 1)]
        for k, vals in rows:
            lines.append(f"| {md(self.use(k))} | " + " | ".join(md(G.fmt(k, v, True)) for v in vals) + " |")
        return "\n".join(lines) + "\n"

    def kv(self, rows: list[tuple[str, Any]]) -> str:
        return md_table(pd.DataFrame({"name": [k for k, _ in rows], "value": [facts.num(v) for _, v in rows]}))

    def parts(self, f: Finding) -> str:
        """A finding's text, metric names in bold."""
        out = []
        for p in f.parts:
            if isinstance(p, Ref):
                self.use(p.key)
                out.append(f"**{md(p.shown)}**")
            else:
                out.append(md(p))
        return "".join(out)

    def findings(self, items: list[Finding], titles: dict[str, str]) -> str:
        lines = [f"- {self.parts(f)} [→ {md(titles.get(f.section, f.section))}]"
                 f"(#{slug(titles.get(f.section, f.section))})" for f in items]
        return "\n".join(lines) + "\n" if lines else "_nothing to summarise yet_\n"

    def glossary(self) -> str:
        """Every metric term this report showed: name, definition, formula."""
        keys = [k for k in G.TERMS if k in self.terms]
        lines = [f"- **{md(G.TERMS[k].name)}**: {md(G.TERMS[k].definition)}"
                 + (f". `{G.TERMS[k].formula}`" if G.TERMS[k].formula else "") for k in keys]
        return "\n## Glossary\n\n" + "\n".join(lines) + "\n"
