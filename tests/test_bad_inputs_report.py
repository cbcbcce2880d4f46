"""Issue 13 (hardening) for ``routesae report`` / ``routesae dashboard``.

- stopping ``routesae dashboard`` with SIGTERM or SIGINT stops its streamlit server and frees the port
  (a real process on a real port);
- CSV copies neutralise spreadsheet formulas in corpus text (OWASP CSV injection) and read back exactly;
- hostile corpus text (script/img/svg HTML, Markdown links and images) never becomes markup in the HTML
  or Markdown report or in the dashboard's HTML blocks;
- a folder without an analysis: one line, exit 2, nothing written.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from plotly.offline import get_plotlyjs
from typer.testing import CliRunner

from routesae.cli import app
from routesae.report import load_analysis
from routesae.report.tables import csv_safe, csv_unescape, list_columns, read_csv_table, write_csv
from tests.analysis_fixture import make_analysis
from tests.ranks import free_port

ROOT = Path(__file__).resolve().parents[1]
FORMULAS = ['=HYPERLINK("http://x","y")', "+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "'=already", "''@twice"]
XSS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", '"><svg onload=alert(1)>',
       "<iframe src=//evil.example></iframe>", "[click](javascript:alert(1))", "![x](http://evil.example/x.png)",
       '<a href="javascript:alert(1)">x</a>', "&lt;b&gt;entity&lt;/b&gt;", "<!-- c -->", "**bold** # h"]
MARKUP_TAGS = {"script", "img", "svg", "iframe", "a", "object", "embed", "style", "link"}


def _hostile_run(tmp_path: Path, strings: list[str]) -> Path:
    """The synthetic analysis with ``strings`` as its corpus tokens, top tokens and document ids."""
    run = make_analysis(tmp_path)
    ana = run / "analysis"
    n = len(strings)
    ctx = pd.read_parquet(ana / "contexts.parquet")
    ctx["tokens"] = [[strings[(r + j) % n] for j in range(len(t))] for r, t in enumerate(ctx["tokens"])]
    ctx["doc_id"] = [strings[r % n] for r in range(len(ctx))]
    ctx.to_parquet(ana / "contexts.parquet", index=False)
    lat = pd.read_parquet(ana / "latents.parquet")
    lat["top_token"] = [None if t is None else strings[i % n] for i, t in enumerate(lat["top_token"])]
    lat["logit_pos"] = [[strings[(i + j) % n] for j in range(len(p))] for i, p in enumerate(lat["logit_pos"])]
    lat["neg_score"] = -1.5 - lat["latent"].astype(float)  # a real negative number column
    lat.to_parquet(ana / "latents.parquet", index=False)
    es = pd.read_parquet(ana / "expert_stats.parquet")
    es["top_tokens"] = [[strings[(i + j) % n] for j in range(3)] for i in range(len(es))]
    es.to_parquet(ana / "expert_stats.parquet", index=False)
    return run


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# ---------------------------------------------------------------- 14: CSV formula injection


def test_csv_safe_rule_is_reversible():
    for s in FORMULAS:
        assert csv_safe(s) == "'" + s and csv_unescape(csv_safe(s)) == s
    for s in ["plain", "'single'", "[1, 2]", "", " =x", "a=b", "'"]:
        assert csv_safe(s) == s and csv_unescape(s) == s
    for v in [-2, -2.5, None, 3.0]:
        assert csv_safe(v) == v


def test_csv_tables_neutralise_formulas_and_round_trip(tmp_path):
    run = _hostile_run(tmp_path, FORMULAS)
    res = CliRunner().invoke(app, ["report", str(run), "--format", "csv"])
    assert res.exit_code == 0, res.output
    tables = run / "report" / "tables"
    with open(tables / "latents.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    live = [r for r in rows if r["top_token"]]
    assert {r["top_token"] for r in live} == {"'" + s for s in FORMULAS}
    assert all(float(r["neg_score"]) < 0 and r["neg_score"].startswith("-") for r in rows)  # numbers untouched
    assert all(r["logit_pos"].startswith("[") for r in rows)  # list cells are JSON: safe as they are
    with open(tables / "contexts.csv", newline="", encoding="utf-8") as f:
        doc_ids = {r["doc_id"] for r in csv.DictReader(f)}
    assert doc_ids == {"'" + s for s in FORMULAS}
    # no string cell of any CSV starts a formula
    for p in tables.glob("*.csv"):
        with open(p, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                assert not any(c[:1] in ("=", "+", "@", "\t", "\r") for c in row), (p.name, row)
                assert not any(c.startswith("-") and not _is_number(c) for c in row), (p.name, row)
    # read_csv_table undoes the quoting exactly; Parquet keeps the raw text
    src = load_analysis(run)
    for name in ("latents", "contexts", "expert_stats"):
        df = getattr(src, name)
        back = read_csv_table(tables / f"{name}.csv", list_columns(df))
        pq = pd.read_parquet(tables / f"{name}.parquet")
        for c in df.columns:
            if df[c].dtype == object or pd.api.types.is_string_dtype(df[c].dtype):
                want = _plain(df[c])
                assert _plain(back[c]) == want, (name, c)
                assert _plain(pq[c]) == want, (name, c)
        if name == "latents":
            assert back["neg_score"].tolist() == df["neg_score"].tolist()


def _plain(col: pd.Series) -> list:
    """Cells as Python values, every missing value as None."""
    return [x.tolist() if hasattr(x, "tolist") else None if x is None or x != x else x for x in col]


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def test_write_csv_header_and_plain_frame(tmp_path):
    df = pd.DataFrame({"=cmd": ["-x", "ok"], "n": [-1, 2]})
    write_csv(df, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_bytes().split(b"\r\n")[:2] == [b"'=cmd,n", b"'-x,-1"]
    back = read_csv_table(tmp_path / "t.csv")
    pd.testing.assert_frame_equal(back, df)


def test_dashboard_csv_zip_goes_through_the_same_writer(tmp_path):
    pytest.importorskip("streamlit")
    run = _hostile_run(tmp_path, FORMULAS)
    sys.path.insert(0, str(ROOT / "dashboards"))
    try:
        from common import report_bytes
    finally:
        sys.path.remove(str(ROOT / "dashboards"))
    z = zipfile.ZipFile(io.BytesIO(report_bytes(load_analysis(run), "csv")))
    rows = list(csv.DictReader(io.StringIO(z.read("tables/latents.csv").decode("utf-8"), newline="")))
    assert {r["top_token"] for r in rows if r["top_token"]} == {"'" + s for s in FORMULAS}


def test_no_other_csv_writer_in_the_package():
    """Every CSV goes through ``write_csv`` (routesae/report/tables.py)."""
    hits = []
    for folder in (ROOT / "routesae", ROOT / "dashboards"):
        for p in folder.rglob("*.py"):
            text = p.read_text(encoding="utf-8")
            if ".to_csv(" in text or "csv.writer(" in text or "csv.DictWriter(" in text:
                hits.append(str(p.relative_to(ROOT)))
    assert hits == ["routesae/report/tables.py"], hits


# ---------------------------------------------------------------- hostile corpus text in the reports


class Elements(HTMLParser):
    """Every element and attribute the HTML creates, and its text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.script_data: list[str] = []
        self._script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._script = tag == "script"
        if self._script:
            self.script_data.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = False

    def handle_data(self, data):
        if self._script:
            self.script_data[-1] += data
        else:
            self.text.append(data)


def _parse(html_text: str) -> Elements:
    p = Elements()
    p.feed(html_text)
    p.close()
    return p


def _no_markup_from_corpus(p: Elements, allowed: set[str]) -> None:
    tags = {t for t, _ in p.tags}
    assert not (tags & MARKUP_TAGS) - allowed, tags
    for tag, attrs in p.tags:
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        assert not any("javascript:" in (v or "").lower() or "evil.example" in (v or "") for v in attrs.values())


def test_html_report_escapes_hostile_corpus_text(tmp_path):
    run = _hostile_run(tmp_path, XSS)
    res = CliRunner().invoke(app, ["report", str(run), "--format", "html"])
    assert res.exit_code == 0, res.output
    text = (run / "report" / "report.html").read_text(encoding="utf-8")
    p = _parse(text)
    # the report's own markup: scripts (plotly.js + one per figure, no src), anchors to its own sections
    _no_markup_from_corpus(p, allowed={"script", "style", "a"})
    assert all(set(attrs) <= {"type"} for t, attrs in p.tags if t == "script")
    assert all(attrs.get("href", "").startswith("#") for t, attrs in p.tags if t == "a")
    for data in p.script_data[1:]:  # figure JSON: corpus text only as \u003c-escaped strings
        assert not any(s.lower() in data.lower() for s in ("<script>alert", "<img", "<svg", "<iframe"))
    low = text.replace(get_plotlyjs(), "").lower()  # plotly.js itself builds <svg> and <img> elements
    assert "<script>alert" not in low and "<img" not in low and "<svg" not in low and "<iframe" not in low
    visible = "".join(p.text)
    for s in XSS:  # shown literally: the text decodes back to the corpus string (no double decoding either)
        assert s in visible, s


def test_markdown_report_escapes_hostile_corpus_text(tmp_path):
    from markdown_it import MarkdownIt

    run = _hostile_run(tmp_path, XSS)
    res = CliRunner().invoke(app, ["report", str(run), "--format", "md"])
    assert res.exit_code == 0, res.output
    md = (run / "report" / "report.md").read_text(encoding="utf-8")
    assert "<script" not in md and "<img" not in md and "<svg" not in md and "[click](" not in md
    rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
    p = _parse(rendered)
    # the report's own links (each key finding -> its section) point at its headings only
    _no_markup_from_corpus(p, allowed={"a"})
    assert all(set(attrs) == {"href"} and attrs["href"].startswith("#") for t, attrs in p.tags if t == "a")
    visible = "".join(p.text)
    for s in XSS:
        if "\n" not in s:
            assert s in visible, s


def test_dashboard_html_blocks_escape_hostile_corpus_text(tmp_path, monkeypatch):
    """The dashboard's own HTML (highlighted contexts) creates only div/span elements from corpus text."""
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from routesae import dashboard

    run = _hostile_run(tmp_path, XSS)
    monkeypatch.setenv(dashboard.RUN_ENV, str(run))
    monkeypatch.delenv(dashboard.MODEL_ENV, raising=False)
    at = AppTest.from_file(str(ROOT / "dashboards" / "app.py"), default_timeout=60)
    at.query_params["feature"] = "0"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    blocks = [m.value for m in at.markdown if m.allow_html]
    assert blocks
    for b in blocks:
        p = _parse(b)
        assert {t for t, _ in p.tags} <= {"div", "span", "style", "b", "br", "code"}, b[:300]
        _no_markup_from_corpus(p, allowed={"style"})
    assert any(XSS[1] in "".join(_parse(b).text) for b in blocks)  # the img payload shown as text


# ---------------------------------------------------------------- no analysis: one line, exit 2, nothing written


@pytest.mark.parametrize("command", ["report", "dashboard"])
@pytest.mark.parametrize("shape", ["empty", "missing", "empty_analysis_dir"])
def test_folder_without_analysis(tmp_path, command, shape):
    run = tmp_path / "run"
    if shape != "missing":
        run.mkdir()
        (run / "config.json").write_text("{}")
    if shape == "empty_analysis_dir":
        (run / "analysis").mkdir()
    before = _listing(tmp_path)
    res = CliRunner().invoke(app, [command, str(run)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "holds no analysis" in lines[0], res.output
    assert "routesae analyze" in lines[0]
    assert _listing(tmp_path) == before


# ---------------------------------------------------------------- 12: signals stop the streamlit server


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_streamlit_and_frees_the_port(tmp_path, sig):
    pytest.importorskip("streamlit")
    psutil = pytest.importorskip("psutil")
    run = make_analysis(tmp_path)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "dashboard.log", "wb")
    # its own session, so that the test's SIGINT reaches routesae only, as it would from `kill -INT PID`
    proc = subprocess.Popen([sys.executable, "-m", "routesae.cli", "dashboard", str(run), "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    children: list = []
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard never opened its port"
                time.sleep(0.3)
        # the port opens before streamlit has finished starting; a signal in between can end it with status 1
        while "You can now view" not in (tmp_path / "dashboard.log").read_text(errors="replace"):
            assert time.monotonic() < deadline, "the dashboard never said it was ready"
            time.sleep(0.3)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "streamlit runs as a child of routesae"
        os.kill(proc.pid, sig)  # routesae only, not its group
        rc = proc.wait(timeout=15)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [c.cmdline() for c in alive]
        deadline = time.monotonic() + 5
        while not _port_free(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _port_free(port), f"port {port} still held"
        assert rc in (0, 128 + sig, -sig), rc
        assert f"http://127.0.0.1:{port}" in (tmp_path / "dashboard.log").read_text()
    finally:
        log.close()
        for p in [proc, *children]:  # never leave a server behind, whatever failed
            try:
                p.kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
        proc.wait(timeout=10)


def test_supervise_escalates_to_sigkill_and_reports_the_status(tmp_path):
    """A child that ignores the forwarded SIGTERM is SIGKILLed after the grace; its status says so."""
    import threading

    from routesae.dashboard import supervise

    ready = tmp_path / "ready"
    stubborn = ("import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")

    def terminate_when_ready():
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # to this process: supervise forwards it

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=terminate_when_ready, daemon=True)
    t.start()
    t0 = time.monotonic()
    assert supervise([sys.executable, "-c", stubborn], dict(os.environ), grace=0.5) == 128 + signal.SIGKILL
    assert time.monotonic() - t0 < 20
    t.join(5)
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored
    assert supervise([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ)) == 3
