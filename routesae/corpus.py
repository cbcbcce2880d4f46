"""Corpus input: documents from JSONL, folders or Hugging Face datasets, tokenised into contexts.

Accepted corpus specs (``CorpusConfig.path``):

- a ``.jsonl`` / ``.jsonl.gz`` file, one JSON object per line with a text and a domain field;
- a folder of ``*.jsonl[.gz]`` shards (for example the shipped ``data/corpus``: files named
  ``train-*.jsonl.gz`` / ``val-*.jsonl.gz`` are chosen by ``split``);
- a folder of ``<domain>/*.txt`` files (each file is one document of that domain);
- a Hugging Face ``datasets`` name, a folder written by ``save_to_disk``, or a local
  ``.parquet`` / ``.csv`` / ``.json`` file read with ``datasets.load_dataset``. Prefix a spec with
  ``hf:`` to force this route.

Tokenisation packs documents into contexts of ``ctx`` tokens: every document starts with BOS
(when the tokenizer has one) and the stream of documents is cut into windows of ``ctx`` tokens;
a long document continues in the next context. With ``packing="pad"`` each document starts a new
context and the tail is padded instead. Padding is marked in the attention mask and never reaches
the store. Every token keeps its document id, its position in the document (BOS = 0) and domain.

Lines that are not valid UTF-8 are skipped and counted (``CorpusStats.skipped_lines``); a warning
says how many, and a corpus with nothing else left is a one-line error.

``corpus_fingerprint`` identifies what a split reads by content (sha256 over the bytes of its
local files, or a hub dataset's own fingerprint); a capture records it and refuses to resume
when it changed. ``first_document`` opens a corpus and reads one document, so a wrong path,
field or an empty corpus fails before anything is written.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class CorpusError(ValueError):
    """A corpus that cannot be read; the message says what to change."""


@dataclass
class CorpusConfig:
    """Where documents come from and which fields hold text and domain."""

    path: str
    text_field: str = "text"
    domain_field: str = "domain"
    split: str = "train"
    default_domain: str = "all"
    shuffle: bool = True
    shuffle_buffer: int = 2048  # documents held for the streaming shuffle (bounded memory)
    seed: int = 0
    max_docs: int | None = None


@dataclass
class CorpusPassConfig:
    """A model run over packed contexts of a corpus: ``max_tokens`` real tokens of ``split`` in contexts
    of ``ctx`` tokens, ``batch_size`` contexts per forward, tables into ``out``. The shared fields of the
    analyses that run a model themselves (analyze-routing, the shared-expert analysis)."""

    model: str
    corpus: str
    out: str
    max_tokens: int = 16384
    ctx: int = 256
    batch_size: int = 8
    split: str = "train"
    text_field: str = "text"
    domain_field: str = "domain"
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False

    def corpus_config(self) -> CorpusConfig:
        return CorpusConfig(self.corpus, self.text_field, self.domain_field, self.split, seed=self.seed)


@dataclass
class Document:
    doc_id: str
    text: str
    domain: str


@dataclass
class CorpusStats:
    documents: int = 0
    skipped_lines: int = 0
    skipped_empty: int = 0
    domains: dict[str, int] = field(default_factory=dict)


FINGERPRINT_PREFIX = "sha256:"


def corpus_files(cfg: CorpusConfig) -> list[Path] | None:
    """The local files that reading ``cfg`` opens (its split's shards), or None for a hub dataset."""
    p = Path(cfg.path[3:] if cfg.path.startswith("hf:") else cfg.path)
    if not p.exists():
        return None
    if p.is_file():
        return [p]
    if not _is_saved_dataset(p):
        files = _jsonl_files(p, cfg.split)
        if files:
            return files
        if any(d.is_dir() for d in p.iterdir()):
            return sorted(f for d in p.iterdir() if d.is_dir() for f in d.rglob("*.txt"))
    return sorted(f for f in p.rglob("*") if f.is_file())  # a save_to_disk folder: all its files


def corpus_fingerprint(cfg: CorpusConfig) -> str:
    """Identity of what reading ``cfg`` sees: ``sha256:`` of the content of every local file its split
    reads (names, sizes and bytes; cost: one extra read of those files, about 1 s per GB), or of a hub
    dataset's own ``_fingerprint`` (the spec alone when the dataset cannot be opened)."""
    h = hashlib.sha256()
    files = corpus_files(cfg)
    if files is None:
        h.update(f"hub:{cfg.path}:{cfg.split}:{_hub_fingerprint(cfg)}".encode())
    root = Path(cfg.path[3:] if cfg.path.startswith("hf:") else cfg.path)
    for f in files or []:
        name = f.relative_to(root) if root.is_dir() else f.name
        h.update(f"{name}:{f.stat().st_size}\n".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return FINGERPRINT_PREFIX + h.hexdigest()[:16]


def legacy_corpus_fingerprint(cfg: CorpusConfig) -> str:
    """The fingerprint stores written before content hashing carry (relative paths and sizes only);
    compared on resume of such a store instead of :func:`corpus_fingerprint`."""
    p = Path(cfg.path)
    h = hashlib.sha256()
    if p.exists():
        files = sorted(x for x in (p.rglob("*") if p.is_dir() else [p]) if x.is_file())
        for f in files:
            h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{f.stat().st_size}".encode())
    else:
        h.update(cfg.path.encode())
    return h.hexdigest()[:16]


def _hub_fingerprint(cfg: CorpusConfig) -> str | None:
    spec = cfg.path[3:] if cfg.path.startswith("hf:") else cfg.path
    try:
        import datasets

        return datasets.load_dataset(spec, split=cfg.split)._fingerprint
    except Exception:  # unreachable: reading the corpus says so in one line
        return None


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()


def first_document(cfg: CorpusConfig) -> Document:
    """Open the corpus and read its first document (no shuffle): a wrong path, a missing text field
    or an empty corpus fail here, in one line, before a capture writes anything."""
    docs = iter_documents(CorpusConfig(cfg.path, cfg.text_field, cfg.domain_field, cfg.split,
                                       cfg.default_domain, shuffle=False, max_docs=1))
    try:
        return next(docs)
    finally:
        docs.close()


# ---------------------------------------------------------------- reading documents


def _open_text_lines(path: Path, stats: CorpusStats) -> Iterator[tuple[int, str]]:
    raw = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    with raw:
        for lineno, line in enumerate(raw, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                stats.skipped_lines += 1
                continue
            if text.strip():
                yield lineno, text


def _read_jsonl(path: Path, cfg: CorpusConfig, stats: CorpusStats) -> Iterator[Document]:
    for lineno, line in _open_text_lines(path, stats):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{lineno} is not valid JSON ({exc.msg}); fix or remove that line") from exc
        if cfg.text_field not in obj:
            raise CorpusError(
                f"{path}:{lineno} has no field '{cfg.text_field}' (fields: {', '.join(sorted(obj)) or 'none'}); "
                f"pass --text-field NAME"
            )
        domain = obj.get(cfg.domain_field, cfg.default_domain)
        doc_id = str(obj.get("doc_id", f"{path.name}:{lineno}"))
        yield Document(doc_id, str(obj[cfg.text_field]), str(domain))


def _read_txt_folder(root: Path, stats: CorpusStats, cfg: CorpusConfig) -> Iterator[Document]:
    files = [(sub, f) for sub in sorted(d for d in root.iterdir() if d.is_dir()) for f in sorted(sub.rglob("*.txt"))]
    if cfg.shuffle:  # file names are cheap: shuffle them all, so domains mix whatever the buffer size
        random.Random(cfg.seed).shuffle(files)
    for sub, f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped_lines += 1
            continue
        yield Document(f"{sub.name}/{f.relative_to(sub)}", text, sub.name)


def _jsonl_files(root: Path, split: str) -> list[Path]:
    files = sorted(f for f in root.iterdir() if f.name.endswith((".jsonl", ".jsonl.gz")))
    chosen = [f for f in files if f.name.startswith(f"{split}-") or f.name.startswith(f"{split}.")]
    return chosen or files


def _read_hf(cfg: CorpusConfig, stats: CorpusStats) -> Iterator[Document]:
    import datasets

    spec = cfg.path[3:] if cfg.path.startswith("hf:") else cfg.path
    p = Path(spec)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.split]
    elif p.is_file():
        builder = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(p.suffix)
        if builder is None:
            raise CorpusError(f"cannot read {p}: use .jsonl[.gz], .parquet, .csv or a folder")
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    else:
        from routesae.hub import dataset_unavailable

        problem = dataset_unavailable(spec)  # offline: fail now rather than after ~30 s of hub retries
        if problem:
            raise CorpusError(f"corpus '{spec}' is not a local path and {problem}")
        try:
            ds = datasets.load_dataset(spec, split=cfg.split)
        except Exception as exc:  # the hub is unreachable offline; say so in one line
            raise CorpusError(
                f"corpus '{spec}' is not a local file or folder and could not be loaded as a Hugging Face "
                f"dataset ({type(exc).__name__}); pass a local path"
            ) from exc
    if cfg.text_field not in ds.column_names:
        raise CorpusError(
            f"dataset '{spec}' has no column '{cfg.text_field}' (columns: {', '.join(ds.column_names)}); "
            f"pass --text-field NAME"
        )
    has_domain = cfg.domain_field in ds.column_names
    for i, row in enumerate(ds):
        domain = row[cfg.domain_field] if has_domain else cfg.default_domain
        yield Document(str(row.get("doc_id", f"{p.name or spec}:{i}")), str(row[cfg.text_field]), str(domain))


def iter_documents(cfg: CorpusConfig, stats: CorpusStats | None = None) -> Iterator[Document]:
    """Documents in a deterministic order (shuffled by ``cfg.seed`` when ``cfg.shuffle``, see
    :func:`_buffered_shuffle`)."""
    stats = stats if stats is not None else CorpusStats()
    p = Path(cfg.path)
    if cfg.path.startswith("hf:") or not p.exists():
        if not cfg.path.startswith("hf:") and (p.suffix in {".jsonl", ".gz", ".txt"} or "/" in cfg.path):
            raise CorpusError(f"corpus '{cfg.path}' does not exist; check the path")
        source: Iterable[Document] = _read_hf(cfg, stats)
    elif p.is_file():
        if p.name.endswith((".jsonl", ".jsonl.gz")):
            source = _read_jsonl(p, cfg, stats)
        else:
            source = _read_hf(cfg, stats)
    elif _is_saved_dataset(p):
        source = _read_hf(cfg, stats)
    else:
        files = _jsonl_files(p, cfg.split)
        if files:
            source = (d for f in files for d in _read_jsonl(f, cfg, stats))
        elif any(d.is_dir() for d in p.iterdir()):
            source = _read_txt_folder(p, stats, cfg)
        else:
            raise CorpusError(f"folder {p} holds no *.jsonl[.gz] files and no <domain>/*.txt folders")

    docs = _buffered_shuffle(source, cfg.shuffle_buffer, cfg.seed) if cfg.shuffle else source
    n = 0
    for doc in docs:
        if not doc.text.strip():
            stats.skipped_empty += 1
            continue
        stats.documents += 1
        stats.domains[doc.domain] = stats.domains.get(doc.domain, 0) + 1
        yield doc
        n += 1
        if cfg.max_docs is not None and n >= cfg.max_docs:
            break
    if stats.skipped_lines and n:  # with nothing left, the error below says it
        log.warning("skipped %d line(s)/file(s) that are not valid UTF-8 in %s", stats.skipped_lines, cfg.path)
    if n == 0 and stats.skipped_lines:
        raise CorpusError(f"corpus '{cfg.path}' has no readable documents: {stats.skipped_lines} line(s)/file(s) "
                          f"are not valid UTF-8; re-encode it as UTF-8")
    if n == 0:
        raise CorpusError(f"corpus '{cfg.path}' has no non-empty documents; check the path, split and text field")


def _buffered_shuffle(items: Iterable[Document], size: int, seed: int) -> Iterator[Document]:
    """Streaming shuffle: hold ``size`` items, emit a random one as each new item arrives.

    Memory stays bounded and reading stops as soon as the consumer does. Items far apart in a
    source sorted by domain mix only within the buffer: shuffle such a file once beforehand, or
    raise the buffer.
    """
    rng = random.Random(seed)
    buf: list[Document] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


# ---------------------------------------------------------------- tokenising into contexts


@dataclass
class ContextBatch:
    """A batch of contexts, right-padded to ``ctx``. Pad positions have mask 0 and doc -1."""

    input_ids: np.ndarray  # [b, ctx] int64
    attention_mask: np.ndarray  # [b, ctx] int64
    doc_index: np.ndarray  # [b, ctx] int64, index into ``doc_ids`` (-1 = pad)
    position: np.ndarray  # [b, ctx] int32, position of the token in its document (BOS = 0)
    context_index: np.ndarray  # [b] int64, global index of each context in the stream

    @property
    def n_real(self) -> int:
        return int(self.attention_mask.sum())


def check_context_options(ctx: int, packing: str) -> None:
    """Raise CorpusError for a context length or packing mode that ContextBuilder cannot use."""
    if ctx < 2:
        raise CorpusError(f"--ctx {ctx} is too small; use at least 2 (default 256)")
    if packing not in ("pack", "pad"):
        raise CorpusError(f"--packing {packing} unknown; use pack or pad")


class ContextBuilder:
    """Turns documents into fixed-length contexts; remembers every document's id and domain."""

    def __init__(self, tokenizer, ctx: int = 256, packing: str = "pack", tokenize_batch: int = 64):
        check_context_options(ctx, packing)
        self.tokenizer = tokenizer
        self.ctx = ctx
        self.packing = packing
        self.tokenize_batch = tokenize_batch
        self.bos = getattr(tokenizer, "bos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad = 0 if pad is None else int(pad)
        self.doc_ids: list[str] = []
        self.doc_domains: list[str] = []

    def _tokenised(self, docs: Iterable[Document]) -> Iterator[tuple[int, list[int]]]:
        chunk: list[Document] = []

        def flush() -> Iterator[tuple[int, list[int]]]:
            enc = self.tokenizer([d.text for d in chunk], add_special_tokens=False)["input_ids"]
            for d, ids in zip(chunk, enc):
                self.doc_ids.append(d.doc_id)
                self.doc_domains.append(d.domain)
                yield len(self.doc_ids) - 1, ([self.bos] if self.bos is not None else []) + list(ids)
            chunk.clear()

        for d in docs:
            chunk.append(d)
            if len(chunk) >= self.tokenize_batch:
                yield from flush()
        if chunk:
            yield from flush()

    def contexts(self, docs: Iterable[Document]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (ids, doc_index, position) arrays of length <= ctx, one context at a time."""
        ctx = self.ctx
        ids_buf: list[int] = []
        doc_buf: list[int] = []
        pos_buf: list[int] = []
        for di, ids in self._tokenised(docs):
            if self.packing == "pad":
                for start in range(0, len(ids), ctx):
                    part = ids[start:start + ctx]
                    yield (np.asarray(part, np.int64), np.full(len(part), di, np.int64),
                           np.arange(start, start + len(part), dtype=np.int32))
                continue
            ids_buf.extend(ids)
            doc_buf.extend([di] * len(ids))
            pos_buf.extend(range(len(ids)))
            while len(ids_buf) >= ctx:
                yield (np.asarray(ids_buf[:ctx], np.int64), np.asarray(doc_buf[:ctx], np.int64),
                       np.asarray(pos_buf[:ctx], np.int32))
                del ids_buf[:ctx], doc_buf[:ctx], pos_buf[:ctx]
        if ids_buf:
            yield np.asarray(ids_buf, np.int64), np.asarray(doc_buf, np.int64), np.asarray(pos_buf, np.int32)

    def batches(self, docs: Iterable[Document], batch_size: int, skip_contexts: int = 0) -> Iterator[ContextBatch]:
        """Batches of ``batch_size`` contexts; the first ``skip_contexts`` are read but not yielded."""
        rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        first = 0
        for ci, row in enumerate(self.contexts(docs)):
            if ci < skip_contexts:
                first = ci + 1
                continue
            rows.append(row)
            if len(rows) == batch_size:
                yield self._pack(rows, first)
                first += len(rows)
                rows = []
        if rows:
            yield self._pack(rows, first)

    def _pack(self, rows, first: int) -> ContextBatch:
        b, ctx = len(rows), self.ctx
        ids = np.full((b, ctx), self.pad, np.int64)
        mask = np.zeros((b, ctx), np.int64)
        doc = np.full((b, ctx), -1, np.int64)
        pos = np.zeros((b, ctx), np.int32)
        for i, (r_ids, r_doc, r_pos) in enumerate(rows):
            n = len(r_ids)
            ids[i, :n], mask[i, :n], doc[i, :n], pos[i, :n] = r_ids, 1, r_doc, r_pos
        return ContextBatch(ids, mask, doc, pos, np.arange(first, first + b, dtype=np.int64))
