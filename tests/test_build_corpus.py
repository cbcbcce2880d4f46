"""Corpus builder and tokenizer: fast tests on tiny local sources (no network), plus the shipped data."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from routesae.zoo import build_corpus as bc
from routesae.zoo.build_corpus import (
    BuildCorpusConfig,
    CorpusInputChanged,
    build_corpus,
    parent_id,
    read_split,
    verify_sources,
)
from routesae.zoo.corpus_sources import Input, Source, chunk_text, detokenize, read_deb

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CORPUS = REPO / "data" / "corpus"
SHIPPED_TOKENIZER = REPO / "data" / "demo-moe"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _paragraphs(i: int, n: int) -> str:
    return "\n\n".join(" ".join(WORDS[(i + j + k) % len(WORDS)] for k in range(40)) for j in range(n))


def _lines_extractor(paths: list[Path]):
    """One document per non-empty block separated by a line holding only ``===``."""
    for path in paths:
        for i, block in enumerate(path.read_text().split("\n===\n")):
            yield f"{path.stem}:{i:03d}", block


@pytest.fixture
def fake_sources(tmp_path: Path) -> list[Source]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "prose.txt").write_text("\n===\n".join(_paragraphs(i, 3) for i in range(120)))
    (src / "long.txt").write_text("\n===\n".join(_paragraphs(i, 40) for i in range(6)))  # ~10 KB docs
    (src / "code.txt").write_text("\n===\n".join(f"def f{i}(x):\n    return x + {i}\n" * 5 for i in range(80)))
    return [
        Source("prose", "literature", "Public-Domain", "fake prose", (Input("file", str(src / "prose.txt")),),
               _lines_extractor),
        Source("long", "literature", "MIT", "fake long documents", (Input("file", str(src / "long.txt")),),
               _lines_extractor),
        Source("snippets", "code", "MIT", "fake code", (Input("file", str(src / "code.txt")),), _lines_extractor),
    ]


def _cfg(tmp_path: Path, sources: list[Source], out: str = "out", **kw) -> BuildCorpusConfig:
    kw = {"domain_token_cap": 1_000_000, "max_doc_bytes": 3000, "val_fraction": 0.1, "fetch": False,
          "shared_dir": tmp_path, "cache_dir": tmp_path / "cache", "log": lambda m: None, **kw}
    return BuildCorpusConfig(out_dir=tmp_path / out, sources=sources, **kw)


def test_build_writes_shards_manifest_and_sources_md(tmp_path, fake_sources):
    manifest = build_corpus(_cfg(tmp_path, fake_sources))
    out = tmp_path / "out"
    docs = list(read_split(out, "train")) + list(read_split(out, "val"))
    assert docs and all(set(d) == {"text", "domain", "source", "doc_id"} for d in docs)
    assert len({d["doc_id"] for d in docs}) == len(docs)
    assert Counter(d["domain"] for d in docs) == {k: v["docs"] for k, v in manifest["domains"].items()}
    assert manifest["totals"]["docs"] == len(docs)
    rec = manifest["sources"]["prose"]["inputs"][0]
    assert rec["sha256"] == bc.sha256_file(tmp_path / "src" / "prose.txt") and rec["input"] == "prose.txt"
    assert str(tmp_path) not in (out / "manifest.json").read_text()  # no machine-specific paths
    sources_md = (out / "SOURCES.md").read_text()
    assert "| literature | prose |" in sources_md and "Public-Domain" in sources_md
    assert not list(out.glob(".*tmp"))  # no leftover temporary files


def test_split_is_document_level_and_deterministic(tmp_path, fake_sources):
    build_corpus(_cfg(tmp_path, fake_sources, "a"))
    build_corpus(_cfg(tmp_path, fake_sources, "b"))
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    train = list(read_split(tmp_path / "a", "train"))
    val = list(read_split(tmp_path / "a", "val"))
    assert val and len(val) < len(train)
    assert any("#p" in d["doc_id"] for d in train + val)  # long documents were cut into parts ...
    assert not {parent_id(d["doc_id"]) for d in train} & {parent_id(d["doc_id"]) for d in val}  # ... kept together
    build_corpus(_cfg(tmp_path, fake_sources, "c", seed=1))
    assert {d["doc_id"] for d in read_split(tmp_path / "c", "val")} != {d["doc_id"] for d in val}


def test_domain_cap_shares_bytes_between_sources(tmp_path, fake_sources):
    manifest = build_corpus(_cfg(tmp_path, fake_sources, domain_token_cap=5000))
    lit = manifest["domains"]["literature"]
    assert lit["bytes"] <= 5000 * 4
    assert manifest["sources"]["prose"]["docs"] > 0 and manifest["sources"]["long"]["docs"] > 0


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    bc.atomic_write(target, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("routesae.atomic.os.replace", boom)
    with pytest.raises(OSError):
        bc.atomic_write(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_verify_sources_detects_changed_input(tmp_path, fake_sources):
    cfg = _cfg(tmp_path, fake_sources)
    build_corpus(cfg)
    assert verify_sources(cfg.out_dir, fake_sources) == {"prose": "ok", "long": "ok", "snippets": "ok"}
    old = bc.sha256_file(tmp_path / "src" / "code.txt")
    with open(tmp_path / "src" / "code.txt", "a") as f:
        f.write("\n===\nprint('changed')\n")
    new = bc.sha256_file(tmp_path / "src" / "code.txt")
    with pytest.raises(CorpusInputChanged) as err:
        verify_sources(cfg.out_dir, fake_sources)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (f"input code.txt of source snippets changed: sha256 {old} recorded, {new} now; "
                   "rebuild with `routesae data build-corpus --force` after checking the licence")
    with pytest.raises(CorpusInputChanged, match="input code.txt of source snippets changed"):
        build_corpus(cfg)  # a rebuild refuses too ...
    cfg.force = True
    build_corpus(cfg)  # ... unless forced
    assert verify_sources(cfg.out_dir, fake_sources)["snippets"] == "ok"


def test_read_deb_reads_data_archive(tmp_path):
    def tar_xz(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"./control": b"Package: x\n"})),
               ("data.tar.xz", tar_xz({"./usr/share/x/a.txt": b"hello", "./usr/share/x/b.bin": b"\0"}))]
    deb = b"!<arch>\n"
    for name, data in members:
        deb += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        deb += b"\n" if len(data) % 2 else b""
    (tmp_path / "x.deb").write_bytes(deb)
    got = dict(read_deb(tmp_path / "x.deb", lambda n: n.endswith(".txt")))
    assert got == {"usr/share/x/a.txt": b"hello"}


def test_text_helpers():
    assert detokenize("Hello , world ( really ) . It 's \" quoted \" !") == "Hello, world (really). It's \"quoted\"!"
    pieces = chunk_text("\n\n".join(["x" * 50] * 10), 120)
    assert len(pieces) == 5 and all(len(p) <= 120 for p in pieces)


# ----------------------------------------------------------------------------- shipped data


@pytest.mark.skipif(not (SHIPPED_CORPUS / "manifest.json").exists(), reason="data/corpus not built")
def test_shipped_corpus_manifest_matches_shards():
    manifest = json.loads((SHIPPED_CORPUS / "manifest.json").read_text())
    per_domain: Counter = Counter()
    per_split: Counter = Counter()
    for split in ("train", "val"):
        for d in read_split(SHIPPED_CORPUS, split):
            per_domain[d["domain"]] += 1
            per_split[split] += 1
    assert per_domain == {k: v["docs"] for k, v in manifest["domains"].items()}
    assert per_split == {"train": manifest["totals"]["train_docs"], "val": manifest["totals"]["val_docs"]}
    assert len(manifest["domains"]) >= 8
    assert all(s["licence"] for s in manifest["sources"].values())
    size = sum(p.stat().st_size for p in SHIPPED_CORPUS.glob("*.jsonl.gz"))
    assert size <= 40 * 2**20
    assert not re.search(r'"(/home|/root|/work|/tmp|/Users)', (SHIPPED_CORPUS / "manifest.json").read_text())


@pytest.mark.skipif(not (SHIPPED_TOKENIZER / "tokenizer.json").exists(), reason="tokenizer not trained")
def test_shipped_tokenizer_loads_and_round_trips():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHIPPED_TOKENIZER))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert tok.bos_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id is not None
    assert 7000 <= len(tok) <= 9000
    for text in ["In the beginning God created the heaven and the earth.",
                 "def f(x):\n    return x ** 2  # square\n", "Tous les êtres humains naissent libres. 人人生而自由 🙂"]:
        ids = tok(text)["input_ids"]
        assert tok.bos_token_id not in ids  # no specials added implicitly
        assert tok.decode(ids) == text
