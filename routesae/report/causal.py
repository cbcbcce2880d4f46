"""Report sections of the causal tools (issue 20): behaviour-linked experts and shared versus routed computation.

``contrast``: ``analysis/contrast.parquet`` (``routesae analyze RUN --contrast A:B``) with the steering
setting kept in ``analysis/settings.json``; ``shared``: ``RUN/shared/`` (``routesae analyze-shared``).
Both sections are empty strings when the run has no such table. Every value is escaped by the
page's table builders (HTML: ``htmlkit.esc``; Markdown: ``mdkit.md``).
"""

from __future__ import annotations

import pandas as pd

from routesae.report.htmlkit import Page, esc, section
from routesae.report.load import Analysis
from routesae.report.mdkit import MdPage, md

TITLES = {"contrast": "Behaviour-linked experts", "shared": "Shared versus routed computation"}
TOP = 12
CONTRAST_COLUMNS = ["rank", "layer", "expert", "rate_a", "rate_b", "risk_diff", "z"]
SHARED_COLUMNS = ["layer", "tokens", "share_norm", "share_proj", "gate", "cos"]


def contrast_info(a: Analysis) -> dict:
    return dict(a.settings.get("contrast") or {})


def _contrast_text(a: Analysis) -> tuple[str, str]:
    info = contrast_info(a)
    da, db = info.get("a", "A"), info.get("b", "B")
    first = a.contrast.iloc[0]
    intro = (f"Every (layer, expert) ranked by rate_A - rate_B, the difference of its activation rates (top-k "
             f"choices per token, BOS left out) between the domains A = {da} and B = {db} "
             f"({int(first['tokens_a']):,} and {int(first['tokens_b']):,} tokens). z treats tokens as independent "
             f"(they are not), so read it as an order of magnitude.")
    steer = info.get("steering") or ""
    return intro, steer


def _shared_text(a: Analysis) -> str:
    s = a.shared.get("summary") or {}
    gate = "" if s.get("mean_gate") is None else f"; mean shared-expert gate {float(s['mean_gate']):.3f}"
    return (f"{s.get('tokens')} tokens of {s.get('corpus')} ({s.get('split')}) through {s.get('model_type')}: per "
            f"token, share_norm = ||s|| / (||s|| + ||r||) for the always-on path s and the routed experts' sum r, "
            f"share_proj = <s, y> / ||y||^2 of the block output y = s + r (the routed part's is 1 - share_proj). "
            f"Mean share_norm {float(s.get('mean_share_norm', float('nan'))):.3f}{gate}.")


def _shared_tables(a: Analysis) -> list[tuple[str, pd.DataFrame]]:
    dom, pos = a.shared.get("shared_domain", pd.DataFrame()), a.shared.get("shared_position", pd.DataFrame())
    out = [("By layer", a.shared.get("shared_layer", pd.DataFrame()))]
    if not dom.empty:
        out.append(("By domain (mean over layers)",
                    dom.groupby("domain", sort=True)[["share_norm", "share_proj", "gate"]].mean().reset_index()))
    if not pos.empty:
        order = list(dict.fromkeys(pos["bucket"]))
        wide = pos.pivot_table(index="bucket", columns="layer", values="share_norm").reindex(order)
        wide.columns = [f"layer {c}" for c in wide.columns]
        out.append(("share_norm by position in the document (cold start)", wide.reset_index()))
    return out


def causal_html(a: Analysis, page: Page) -> list[tuple[str, str]]:
    """``[(anchor, section html)]`` for the contrast and shared sections the run has."""
    out = []
    if not a.contrast.empty:
        intro, steer = _contrast_text(a)
        body = f"<p>{esc(intro)}</p>" + page.table(a.contrast, CONTRAST_COLUMNS, top=TOP,
                                                   source="analysis/contrast.parquet")
        if steer:
            body += (f"<p>Steer toward A with the top experts: <code>routesae steer --run {esc(a.run)} --experts "
                     f"'{esc(steer)}' --prompt ...</code></p>")
        out.append(("contrast", section("contrast", TITLES["contrast"], body)))
    if a.shared:
        body = f"<p>{esc(_shared_text(a))}</p>"
        for title, df in _shared_tables(a):
            body += f"<h3>{esc(title)}</h3>" + page.table(df, top=TOP * 2)
        out.append(("shared", section("shared", TITLES["shared"], body)))
    return out


def causal_md(a: Analysis, page: MdPage) -> str:
    out = []
    if not a.contrast.empty:
        intro, steer = _contrast_text(a)
        out += [f"\n## {TITLES['contrast']}\n\n{md(intro)}\n\n",
                page.table(a.contrast, CONTRAST_COLUMNS, top=TOP, source="analysis/contrast.parquet")]
        if steer:
            out.append(f"\nSteer toward A with the top experts: `routesae steer --run RUN --experts "
                       f"'{steer.replace('`', '')}' --prompt ...`\n")
    if a.shared:
        out.append(f"\n## {TITLES['shared']}\n\n{md(_shared_text(a))}\n")
        for title, df in _shared_tables(a):
            out += [f"\n**{md(title)}**\n\n", page.table(df, top=TOP * 2)]
    return "".join(out)
