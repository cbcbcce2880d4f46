"""Bad inputs to capture and the store commands: one-line errors, nothing written or overwritten,
and the corrected command then succeeds into the same --out (issue 13, hardening)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from routesae.capture import CaptureConfig, capture
from routesae.cli import app
from routesae.corpus import CorpusConfig, legacy_corpus_fingerprint
from routesae.store import Store, StoreError
from routesae.store_lock import LOCK_NAME
from tests.conftest import DOCS

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def _args(model, corpus, out, *extra) -> list[str]:
    return ["capture", str(model), str(corpus), "--out", str(out), "--ctx", "24", "--batch-size", "3",
            "--device", "cpu", "-q", *extra]


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _error(res, *words: str) -> str:
    """The one-line error of a refused command (exit 2), checked for ``words``."""
    assert res.exit_code == 2, res.output
    out = res.output.strip()
    assert "\n" not in out and out.startswith("error: "), res.output
    for w in words:
        assert w in out, out
    return out


def _ok(res) -> None:
    assert res.exit_code == 0, res.output


def _snapshot(root: Path) -> dict | None:
    """Every file under ``root`` with its bytes and mtime (None: no such path)."""
    if not root.exists():
        return None
    if root.is_file():
        return {".": (root.read_bytes(), root.stat().st_mtime_ns)}
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _write_jsonl(path: Path, docs=DOCS * 3) -> Path:
    with open(path, "w") as f:
        for i, (domain, text) in enumerate(docs):
            f.write(json.dumps({"text": text, "domain": domain, "doc_id": f"d{i}"}) + "\n")
    return path


def _cfg(ckpt, corpus, out, **kw) -> CaptureConfig:
    base = dict(model=str(ckpt), corpus=str(corpus), out=str(out), ctx=24, batch_size=3, layers="all",
                shard_mb=0.02, device="cpu", progress=False, seed=1)
    return CaptureConfig(**{**base, **kw})


class Stop(Exception):
    pass


def _stop_after_shard_1(shard):
    if shard["index"] == 1:
        raise Stop


# ---------------------------------------------------------------- model, corpus and options


def test_missing_model_folder_then_fixed(tiny_ckpt, corpus_jsonl, tmp_path):
    out = tmp_path / "s"
    _error(_cli(*_args(tmp_path / "no-model", corpus_jsonl, out)), "no-model", "not found")
    assert not out.exists()
    _ok(_cli(*_args(tiny_ckpt("olmoe"), corpus_jsonl, out, "--max-tokens", "40")))


def test_folder_that_is_not_an_lm(corpus_jsonl, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.bin").write_bytes(b"x")
    _error(_cli(*_args(tmp_path / "m", corpus_jsonl, tmp_path / "s")), "no config.json")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("bad, fix, words", [
    (["--text-field", "body"], ["--text-field", "text"], ["no field 'body'", "--text-field"]),
    (["--ctx", "1"], ["--ctx", "24"], ["--ctx 1", "at least 2"]),
    (["--ctx", "0"], ["--ctx", "24"], ["--ctx 0", "at least 2"]),
    (["--batch-size", "0"], ["--batch-size", "3"], ["--batch-size 0"]),
    (["--max-tokens", "0"], ["--max-tokens", "40"], ["--max-tokens 0"]),
    (["--shard-mb", "0"], ["--shard-mb", "1"], ["--shard-mb"]),
    (["--shard-mb", "-2"], ["--shard-mb", "1"], ["--shard-mb"]),
    (["--packing", "zip"], ["--packing", "pad"], ["--packing zip", "pack or pad"]),
    (["--backend", "jax"], ["--backend", "hf"], ["--backend jax", "hf or tl"]),
    (["--dtype", "float8"], ["--dtype", "float32"], ["--dtype float8"]),
    (["--store-dtype", "int8"], ["--store-dtype", "bfloat16"], ["--store-dtype int8", "bfloat16"]),
    (["--device", "gpu0"], ["--device", "cpu"], ["--device gpu0"]),
    (["--layers", "9"], ["--layers", "3"], ["out of range", "0..3"]),
    (["--layers", "x"], ["--layers", "1:2"], ["cannot read layer spec"]),
    (["--routing-override", "bogus"], ["--routing-override", "topk:1"], ["bogus"]),
])
def test_bad_option_writes_nothing_and_the_fix_succeeds(bad, fix, words, tiny_ckpt, corpus_jsonl, tmp_path):
    out = tmp_path / "s"
    base = _args(tiny_ckpt("olmoe"), corpus_jsonl, out)
    _error(_cli(*base, *bad), *words)
    assert not out.exists()
    extra = [] if "--max-tokens" in fix else ["--max-tokens", "40"]
    _ok(_cli(*base, *extra, *fix))
    assert Store(out).manifest["complete"]


def test_wrong_corpus_path_then_fixed(tiny_ckpt, corpus_jsonl, tmp_path):
    out = tmp_path / "s"
    _error(_cli(*_args(tiny_ckpt("olmoe"), tmp_path / "nope.jsonl", out)), "nope.jsonl", "does not exist")
    assert not out.exists()
    _ok(_cli(*_args(tiny_ckpt("olmoe"), corpus_jsonl, out, "--max-tokens", "40")))


@pytest.mark.parametrize("content", [b"", b"\n  \n", json.dumps({"text": "  "}).encode() + b"\n"])
def test_empty_corpus(content, tiny_ckpt, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(content)
    _error(_cli(*_args(tiny_ckpt("olmoe"), corpus, tmp_path / "s")), "no non-empty documents")
    assert not (tmp_path / "s").exists()


def test_non_utf8_corpus(tiny_ckpt, tmp_path):
    bad = b'{"text": "caf\xe9 au lait"}\n'
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(bad * 3)
    _error(_cli(*_args(tiny_ckpt("olmoe"), corpus, tmp_path / "s")), "3 line(s)", "not valid UTF-8")
    assert not (tmp_path / "s").exists()
    _write_jsonl(corpus)
    corpus.write_bytes(bad + corpus.read_bytes() + bad)  # two bad lines among good ones: skipped and counted
    _ok(_cli(*_args(tiny_ckpt("olmoe"), corpus, tmp_path / "s")))
    assert Store(tmp_path / "s").manifest["corpus_stats"]["skipped_non_utf8"] == 2


def test_failed_start_store_is_replaced_by_a_corrected_run(tiny_ckpt, tmp_path):
    """A corpus that fails after the first shard's worth was read leaves an empty, incomplete store;
    the re-run with other arguments replaces it instead of refusing 'different arguments'."""
    ckpt, out = tiny_ckpt("olmoe"), tmp_path / "s"
    broken = _write_jsonl(tmp_path / "broken.jsonl")
    with open(broken, "a") as f:
        f.write(json.dumps({"body": "no text field"}) + "\n")
    _error(_cli(*_args(ckpt, broken, out)), "broken.jsonl:19", "no field 'text'")
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokens"] == 0 and m["shards"] == [] and not m["complete"]
    _ok(_cli(*_args(ckpt, _write_jsonl(tmp_path / "fixed.jsonl"), out, "--max-tokens", "40")))
    s = Store(out)
    assert s.manifest["complete"] and s.n_tokens == 40 and s.manifest["corpus"]["path"].endswith("fixed.jsonl")


# ---------------------------------------------------------------- the --out folder


def test_out_folder_that_is_not_a_store_is_refused(tiny_ckpt, corpus_jsonl, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / ".notes.tmp-1").write_text("and me")
    before = _snapshot(out)
    _error(_cli(*_args(tiny_ckpt("olmoe"), corpus_jsonl, out)), str(out), "not a store", "new or empty folder")
    assert _snapshot(out) == before


def test_out_that_is_a_file(tiny_ckpt, corpus_jsonl, tmp_path):
    out = tmp_path / "file"
    out.write_text("data")
    before = _snapshot(out)
    _error(_cli(*_args(tiny_ckpt("olmoe"), corpus_jsonl, out)), str(out), "is a file")
    assert _snapshot(out) == before


def test_resume_removes_only_the_writers_own_temporary_files(tiny_ckpt, corpus_jsonl, tmp_path):
    ckpt, out = tiny_ckpt("olmoe"), tmp_path / "s"
    full = Store(capture(_cfg(ckpt, corpus_jsonl, tmp_path / "full", max_tokens=300)))
    with pytest.raises(Stop):
        capture(_cfg(ckpt, corpus_jsonl, out, max_tokens=300), on_shard=_stop_after_shard_1)
    ours = [out / ".acts-00002.safetensors.tmp-4242", out / ".router-00002.safetensors.tmp-4242",
            out / ".manifest.json.tmp-7", out / "tokens.parquet" / ".part-00002.parquet.tmp-4242"]
    users = [out / ".notes.tmp-1", out / ".acts-00002.safetensors.tmp-x", out / "tokens.parquet" / ".mine.tmp-3"]
    for p in ours + users:
        p.write_bytes(b"partial")
    (out / LOCK_NAME).write_text("999999\n")  # a killed capture's lock file: its flock died with it
    resumed = Store(capture(_cfg(ckpt, corpus_jsonl, out, max_tokens=300)))
    assert [s["sha256"] for s in resumed.shards] == [s["sha256"] for s in full.shards]
    assert not any(p.exists() for p in ours) and all(p.read_bytes() == b"partial" for p in users)
    assert not (out / LOCK_NAME).exists()


def test_folder_with_only_capture_leftovers_counts_as_empty(tiny_ckpt, corpus_jsonl, tmp_path):
    out = tmp_path / "s"
    (out / "tokens.parquet").mkdir(parents=True)
    (out / LOCK_NAME).write_text("123\n")
    (out / ".manifest.json.tmp-123").write_text("{")
    _ok(_cli(*_args(tiny_ckpt("olmoe"), corpus_jsonl, out, "--max-tokens", "30")))
    assert sorted(p.name for p in out.iterdir()) == ["acts-00000.safetensors", "manifest.json",
                                                     "router-00000.safetensors", "tokens.parquet"]


# ---------------------------------------------------------------- a changed corpus


def test_resume_after_the_corpus_changed_is_refused(tiny_ckpt, tmp_path):
    ckpt, out = tiny_ckpt("qwen2_moe"), tmp_path / "s"
    corpus = _write_jsonl(tmp_path / "c.jsonl")
    with pytest.raises(Stop):
        capture(_cfg(ckpt, corpus, out), on_shard=_stop_after_shard_1)
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 2
    text = corpus.read_text()
    edited = text.replace("quick brown fox", "quick brown cat", 1)
    assert edited != text and len(edited.encode()) == len(text.encode())
    corpus.write_text(edited)
    before = _snapshot(out)
    with pytest.raises(StoreError) as err:
        capture(_cfg(ckpt, corpus, out))
    msg = str(err.value)
    assert "\n" not in msg and f"corpus {corpus} changed since this store was captured (fingerprint sha256:" in msg
    assert msg.endswith("; capture into a new --out")
    assert _snapshot(out) == before
    corpus.write_text(text)  # the original corpus back: the resume goes on
    assert Store(capture(_cfg(ckpt, corpus, out))).manifest["complete"]


def test_rerun_of_a_complete_store_over_a_changed_corpus_is_refused(tiny_ckpt, tmp_path):
    ckpt, out = tiny_ckpt("olmoe"), tmp_path / "s"
    corpus = _write_jsonl(tmp_path / "c.jsonl")
    args = _args(ckpt, corpus, out, "--max-tokens", "60")
    _ok(_cli(*args))
    before = _snapshot(out)
    _ok(_cli(*args))  # the same corpus: nothing to do
    assert _snapshot(out) == before
    corpus.write_text(corpus.read_text().replace("lazy dog", "lazy cat"))
    _error(_cli(*args), "changed since this store was captured", "new --out")
    assert _snapshot(out) == before


def test_store_with_a_legacy_fingerprint_still_reruns(tiny_ckpt, corpus_jsonl, tmp_path):
    cfg = _cfg(tiny_ckpt("olmoe"), corpus_jsonl, tmp_path / "s", max_tokens=40)
    capture(cfg)
    path = tmp_path / "s" / "manifest.json"
    m = json.loads(path.read_text())
    m["corpus"]["fingerprint"] = legacy_corpus_fingerprint(CorpusConfig(str(corpus_jsonl)))
    path.write_text(json.dumps(m))
    before = _snapshot(tmp_path / "s")
    capture(cfg)
    assert _snapshot(tmp_path / "s") == before


# ---------------------------------------------------------------- garbled and missing files


@pytest.fixture()
def small_store(tiny_ckpt, corpus_jsonl, tmp_path) -> Path:
    out = tmp_path / "s"
    _ok(_cli(*_args(tiny_ckpt("olmoe"), corpus_jsonl, out, "--shard-mb", "0.02", "--max-tokens", "200")))
    assert len(Store(out).shards) >= 3
    return out


def test_garbled_manifest_is_named_by_reader_and_writer(small_store, tiny_ckpt, corpus_jsonl):
    manifest = small_store / "manifest.json"
    for garbage in (b'{"format_version": 1, "tok', b"\xff\xfe", b"[1, 2]"):
        manifest.write_bytes(garbage)
        before = _snapshot(small_store)
        with pytest.raises(StoreError, match="manifest.json is garbled"):
            Store(small_store)
        _error(_cli("store", "info", small_store), str(manifest), "garbled", "capture the store again")
        _error(_cli("store", "verify", small_store), str(manifest), "garbled")
        _error(_cli(*_args(tiny_ckpt("olmoe"), corpus_jsonl, small_store, "--shard-mb", "0.02", "--max-tokens",
                           "200")), str(manifest), "garbled", "left as it is")
        assert _snapshot(small_store) == before


@pytest.mark.parametrize("name, load", [
    ("acts-00001.safetensors", lambda s: s.load_resid(1)),
    ("router-00001.safetensors", lambda s: s.load_router(1)),
    ("tokens.parquet/part-00001.parquet", lambda s: s.tokens()),
])
def test_missing_shard_file_is_named(name, load, small_store):
    (small_store / name).unlink()
    with pytest.raises(StoreError) as err:
        load(Store(small_store))
    assert str(err.value) == (f"store {small_store} lacks {name} (listed in its manifest); capture the store again")
    _error(_cli("store", "verify", small_store), name, "capture the store again")


def test_flipped_byte_is_named_by_verify(small_store):
    p = small_store / "router-00002.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))
    _error(_cli("store", "verify", small_store), str(p), "does not match its sha256")


def test_truncated_shard_is_a_one_line_error(small_store):
    p = small_store / "acts-00000.safetensors"
    p.write_bytes(p.read_bytes()[:5])
    with pytest.raises(StoreError, match="cannot read store .*: acts-00000.safetensors is damaged") as err:
        Store(small_store).load_resid(0)
    assert "\n" not in str(err.value)
    p = small_store / "tokens.parquet" / "part-00001.parquet"
    p.write_bytes(b"PAR1 not parquet")
    with pytest.raises(StoreError, match="tokens.parquet/part-00001.parquet is damaged") as err:
        Store(small_store).tokens()
    assert "\n" not in str(err.value)


def test_store_info_on_what_is_not_a_store(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.txt").write_text("x")
    _error(_cli("store", "info", tmp_path / "folder"), "not a store (no manifest.json)", "routesae capture")
    (tmp_path / "file").write_text("x")
    _error(_cli("store", "info", tmp_path / "file"), "is a file")
    _error(_cli("store", "verify", tmp_path / "missing"), "not a store")


# ---------------------------------------------------------------- two writers, kill -9


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_second_capture_into_a_locked_folder_is_refused(tiny_ckpt, corpus_jsonl, tmp_path):
    out = tmp_path / "s"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from routesae.store_lock import store_lock\n"
         f"with store_lock({str(out)!r}):\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(out)
        args = _args(tiny_ckpt("olmoe"), corpus_jsonl, out, "--max-tokens", "40")
        _error(_cli(*args), f"another capture is writing into {out} (pid {holder.pid})", "choose another --out")
        assert _snapshot(out) == before == {LOCK_NAME: before[LOCK_NAME]}
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    _ok(_cli(*args))  # released: the capture runs
    assert not (out / LOCK_NAME).exists()


def test_lock_held_by_a_second_open_in_this_process(tiny_ckpt, corpus_jsonl, tmp_path):
    import fcntl

    store = tmp_path / "s"
    _ok(_cli(*_args(tiny_ckpt("olmoe"), corpus_jsonl, store, "--shard-mb", "0.02")))
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["complete"] = False  # an interrupted store another writer is resuming
    (store / "manifest.json").write_text(json.dumps(manifest))
    with open(store / LOCK_NAME, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = _snapshot(store)
        _error(_cli(*_args(tiny_ckpt("olmoe"), corpus_jsonl, store, "--shard-mb", "0.02")),
               "another capture is writing into", "pid unknown")
        assert _snapshot(store) == before


def test_kill_9_then_resume_equals_an_uninterrupted_capture(tiny_ckpt, corpus_jsonl, tmp_path, one_thread):
    """The subprocess's start (imports, model load) is most of this test's time."""
    ckpt, corpus = tiny_ckpt("olmoe"), corpus_jsonl
    out = tmp_path / "s"
    args = _args(ckpt, corpus, out, "--layers", "all", "--shard-mb", "0.02")
    proc = subprocess.Popen([sys.executable, "-m", "routesae.cli", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads((out / "manifest.json").read_text())["shards"]:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    killed = json.loads((out / "manifest.json").read_text())
    assert proc.returncode == -signal.SIGKILL and killed["shards"] and not killed["complete"]
    _ok(_cli(*args))  # the same command again resumes
    full = tmp_path / "full"
    _ok(_cli(*_args(ckpt, corpus, full, "--layers", "all", "--shard-mb", "0.02")))
    a, b = Store(out), Store(full)
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards] and len(a.shards) > len(killed["shards"])
    pd.testing.assert_frame_equal(a.tokens(), b.tokens())
    a.verify()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in full.iterdir())
