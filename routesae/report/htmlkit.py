"""Building blocks of the self-contained HTML reports: escaping, tables, figures, findings, glossary, the page.

Every string that comes from a run (corpus tokens, domains, document ids, paths, config values) goes
through :func:`esc` (``html.escape(s, quote=True)``). A :class:`Page` renders figures (plotly.js is
inlined once by :func:`document`) and tables, and records which metric terms it showed so that the
glossary lists exactly those. The page's own script (a table sorter and a print resize) is inline and
bound with ``addEventListener``: no ``on*`` attribute, no external resource.
"""

from __future__ import annotations

import html
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from routesae.report import glossary as G
from routesae.report.findings import Finding, Ref
from routesae.report.load import scalar

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa;
  line-height:1.45}
main{max-width:1500px;margin:auto;padding:1em 2em;box-sizing:border-box}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:.5em 2em;z-index:10;display:flex;
  flex-wrap:wrap;gap:.2em 1.2em}
nav a{color:#1f4e9a;text-decoration:none}
section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:.5em 1.2em 1em;margin:1em 0;min-width:0}
h1{margin:.4em 0 .1em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
.tw{max-width:100%;overflow-x:auto}
th,td{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}
th,td.k{background:#f2f2f2}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[data-dir=asc]::after{content:" ▲"}
table.sortable th[data-dir=desc]::after{content:" ▼"}
abbr[title]{text-decoration:underline dotted;cursor:help}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,430px),1fr));gap:12px;align-items:start}
.fig{min-width:0;max-width:100%}
.fig.wide{grid-column:1/-1}
ul.findings{padding-left:1.2em}
ul.findings li{margin:.4em 0}
ul.findings a.go{margin-left:.4em;color:#1f4e9a;text-decoration:none;white-space:nowrap}
.data{background:#eef5ff;border-left:4px solid #1f4e9a;padding:.4em .8em}
.data.warn{background:#fff4e5;border-left-color:#c77700}
dl.glossary dt{font-weight:600;margin-top:.6em}
dl.glossary dd{margin-left:1.2em}
.formula{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;color:#333}
details>summary{cursor:pointer;color:#1f4e9a;margin:.3em 0}
.feature{border-top:2px solid #ccc;margin-top:1.5em;padding-top:.5em}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;line-height:1.9;margin:.2em 0;
  white-space:pre-wrap;word-break:break-all}
.ctx .meta{color:#777;font-family:system-ui,sans-serif;font-size:.9em;margin-right:.6em}
.tok{border-radius:2px;padding:1px 0}
.tok.c{outline:1.5px solid #b04000}
.chip{display:inline-block;font-family:ui-monospace,monospace;background:#eef;border-radius:3px;padding:0 4px;
  margin:1px;white-space:pre}
.note{color:#666;font-size:.9em}
@page{size:A4;margin:12mm}
@media print{
  nav,.modebar-container,details>summary{display:none!important}
  body{background:#fff}
  main{max-width:none;padding:0}
  section{break-before:page;border:0;padding:0;margin:0}
  section.first,section.short{break-before:auto}
  section.short{margin-top:1.5em}
  .fig,tr,li,dt,dd{break-inside:avoid}
  h2,h3{break-after:avoid}
}
"""

SCRIPT = """
(function(){
  function key(td){var v=td.getAttribute('data-v');if(v!==null&&v!==''&&!isNaN(+v))return +v;
    var t=td.textContent.trim();return t!==''&&!isNaN(+t)?+t:t.toLowerCase();}
  document.querySelectorAll('table.sortable').forEach(function(t){
    t.querySelectorAll('thead th').forEach(function(th,i){
      th.addEventListener('click',function(){
        var desc=th.getAttribute('data-dir')!=='desc',body=t.tBodies[0],rows=[].slice.call(body.rows);
        t.querySelectorAll('thead th').forEach(function(h){h.removeAttribute('data-dir');});
        th.setAttribute('data-dir',desc?'desc':'asc');
        rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
          if(typeof x!==typeof y){x=String(x);y=String(y);}return (x<y?-1:x>y?1:0)*(desc?-1:1);});
        rows.forEach(function(r){body.appendChild(r);});});});});
  function fit(){if(window.Plotly)document.querySelectorAll('.js-plotly-plot').forEach(function(g){
    window.Plotly.Plots.resize(g);});}
  window.addEventListener('beforeprint',fit);
  window.routesaeFit=fit;
})();
"""


def esc(s: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape(str(s), quote=True)


def tok(s: Any) -> str:
    """A token made visible: newline -> ↵, tab -> →; then escaped."""
    return esc(str(s).replace("\n", "↵").replace("\t", "→"))


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Page:
    """Renders figures and tables of one report; remembers the figures drawn and the metric terms shown."""

    def __init__(self) -> None:
        self.count = 0
        self.terms: list[str] = []

    # ---- figures
    def fig(self, figure: go.Figure, wide: bool = False) -> str:
        """A figure as a ``div.fig`` plot container (``wide``: the whole row of a grid) with its inline script."""
        self.count += 1
        body = figure.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                              config={"displaylogo": False, "responsive": True})
        return f"<div class='fig{' wide' if wide else ''}'>{body}</div>"

    __call__ = fig

    # ---- terms
    def term(self, key: str, text: str | None = None) -> str:
        """A metric name with its definition on hover (``<abbr title>``); recorded for the glossary."""
        t = G.TERMS[key]
        if key not in self.terms:
            self.terms.append(key)
        return f"<abbr title='{esc(G.hover(t))}'>{esc(text or t.name)}</abbr>"

    def th(self, column: str) -> str:
        t = G.term_for(column)
        return f"<th>{self.term(t[0], G.label(column)) if t else esc(G.label(column))}</th>"

    def parts(self, f: Finding) -> str:
        """A finding's text: plain parts escaped, metric names as :meth:`term`."""
        return "".join(self.term(p.key, p.shown) if isinstance(p, Ref) else esc(p) for p in f.parts)

    # ---- tables
    def _rows(self, df: pd.DataFrame, cols: list[str], digits: int, value_term: str | None = None) -> str:
        keys = {c: (G.term_for(c) or (None,))[0] or (value_term if c not in G.PLAIN else None) for c in cols}
        body = []
        for row in df[cols].itertuples(index=False):
            cells = []
            for c, v in zip(cols, row):
                v = scalar(v)
                shown = G.fmt(keys[c], v) if keys[c] else _plain(v, digits)
                cells.append(f"<td class='n' data-v='{esc(v)}'>{esc(shown)}</td>" if _numeric(v)
                             else f"<td>{esc(shown)}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        return "".join(body)

    def table(self, df: pd.DataFrame | None, columns: list[str] | None = None, top: int | None = None,
              sortable: bool = False, source: str | None = None, digits: int = 4,
              value_term: str | None = None) -> str:
        """A table with human headers (hover: the definition). More than ``top`` rows: the first ``top`` shown,
        every row in a collapsed ``<details>`` (sortable); ``source`` names the CSV holding all rows.
        ``value_term``: the unit of columns that are neither metrics nor identifiers (one column per run)."""
        if value_term:
            self.term(value_term)
        if df is None or df.empty:
            return '<p class="note">no rows</p>'
        cols = [c for c in (columns or list(df.columns)) if c in df.columns]
        head = "".join(self.th(c) for c in cols)
        sort_cls = " class='sortable'"
        cls = sort_cls if sortable else ""

        def one(d: pd.DataFrame, c: str = cls) -> str:
            rows = self._rows(d, cols, digits, value_term)
            return f"<div class='tw'><table{c}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"

        if top is None or len(df) <= top:
            return one(df)
        where = f"; every row also in <code>{esc(source)}</code>" if source else ""
        return (one(df.head(top), "") + f"<details><summary>All {len(df):,} rows"
                f"{' (click a column to sort)' if sortable else ''}</summary>"
                f"<p class='note'>{len(df):,} rows{where}</p>{one(df, sort_cls)}</details>")

    def metrics(self, rows: list[tuple[str, list[Any]]], headers: list[str]) -> str:
        """Metrics as rows: the term (hover: its definition) then one value per column, in the term's unit."""
        head = "<th>Metric</th>" + "".join(f"<th>{esc(h)}</th>" for h in headers)
        body = "".join(f"<tr><th>{self.term(k)}</th>" + "".join(
            f"<td class='n' data-v='{esc(scalar(v))}'>{esc(G.fmt(k, v, True))}</td>" for v in vals) + "</tr>"
            for k, vals in rows)
        return f"<div class='tw'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"

    def kv(self, rows: list[tuple[str, Any]], terms: dict[str, str] | None = None) -> str:
        """Name / value rows (run details, a latent's facts); a name in ``terms`` is shown as that metric term."""
        terms = terms or {}
        body = "".join(
            f"<tr><td class='k'>{self.term(terms[k], k) if k in terms else esc(k)}</td>"
            f"<td>{esc(G.fmt(terms[k], v) if k in terms else _plain(v, 4))}</td></tr>" for k, v in rows)
        return f"<div class='tw'><table class='kv'><tbody>{body}</tbody></table></div>"

    # ---- findings and glossary
    def findings(self, items: list[Finding], titles: dict[str, str]) -> str:
        """The key findings list: one line each, linked to its section."""
        lis = "".join(f"<li>{self.parts(f)}<a class='go' href='#{esc(f.section)}'>→ {esc(titles.get(f.section, ''))}"
                      f"</a></li>" for f in items)
        return f"<ul class='findings'>{lis}</ul>" if lis else "<p class='note'>nothing to summarise yet</p>"

    def glossary(self) -> str:
        """Every metric term this page showed: name, definition, formula (REFERENCE §4 and §7 wording)."""
        keys = [k for k in G.TERMS if k in self.terms]
        items = "".join(f"<dt id='g-{esc(k)}'>{esc(G.TERMS[k].name)}</dt><dd>{esc(G.TERMS[k].definition)}"
                        + (f"<br><span class='formula'>{esc(G.TERMS[k].formula)}</span>" if G.TERMS[k].formula
                           else "") + "</dd>" for k in keys)
        return ("<section id='glossary' class='short'><h2>Glossary</h2><p class='note'>Every metric this report "
                "shows; hover a metric's name anywhere for its definition.</p>"
                f"<dl class='glossary'>{items}</dl></section>")


def _plain(v: Any, digits: int) -> str:
    from routesae.report.facts import num

    return num(v, digits)


def section(anchor: str, title: str, body: str, first: bool = False, short: bool = False) -> str:
    """A report section; printed on a new page unless ``first`` or ``short`` (then it follows on)."""
    cls = " class='first'" if first else " class='short'" if short else ""
    return f"<section id='{anchor}'{cls}><h2>{esc(title)}</h2>{body}</section>"


def document(title: str, subtitle: str, nav: list[tuple[str, str]], body: str, page: Page) -> str:
    """The whole page: plotly.js inlined once, the CSS, the sections, then the page's own small script."""
    links = "".join(f"<a href='#{esc(k)}'>{esc(v)}</a>" for k, v in nav)
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(title)}</title><style>{CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<nav>{links}</nav><main><h1>{esc(title)}</h1><p class='note'>{esc(subtitle)}</p>{body}"
            f"<p class='note'>{page.count} figures · plotly.js inlined, opens offline</p></main>"
            f"<script type='text/javascript'>{SCRIPT}</script></body></html>\n")
