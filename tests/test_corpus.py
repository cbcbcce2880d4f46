import gzip
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from routesae.corpus import ContextBuilder, CorpusConfig, CorpusError, CorpusStats, iter_documents
from tests.conftest import DOCS


def _write_jsonl(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_jsonl_gz_and_custom_fields(tmp_path):
    p = tmp_path / "c.jsonl.gz"
    _write_jsonl(p, [{"body": "alpha beta", "kind": "x"}, {"body": "gamma", "kind": "y"}], gz=True)
    docs = list(iter_documents(CorpusConfig(str(p), text_field="body", domain_field="kind", shuffle=False)))
    assert [(d.text, d.domain) for d in docs] == [("alpha beta", "x"), ("gamma", "y")]
    assert docs[0].doc_id == "c.jsonl.gz:1"


def test_txt_folder_domains(tmp_path):
    for domain, text in DOCS[:3]:
        (tmp_path / domain).mkdir(exist_ok=True)
        (tmp_path / domain / f"{len(text)}.txt").write_text(text)
    docs = list(iter_documents(CorpusConfig(str(tmp_path), shuffle=False)))
    assert sorted(d.domain for d in docs) == ["code", "math", "prose"]
    assert all(d.doc_id.startswith(d.domain + "/") for d in docs)


def test_hf_datasets_local_parquet(tmp_path):
    import pandas as pd

    p = tmp_path / "c.parquet"
    pd.DataFrame({"text": ["one two", "three"], "domain": ["a", "b"]}).to_parquet(p)
    docs = list(iter_documents(CorpusConfig(str(p), shuffle=False)))
    assert [(d.text, d.domain) for d in docs] == [("one two", "a"), ("three", "b")]
    # the hf: prefix forces the datasets route for a saved dataset folder too
    import datasets

    datasets.Dataset.from_dict({"text": ["x y"], "domain": ["z"]}).save_to_disk(str(tmp_path / "saved"))
    docs = list(iter_documents(CorpusConfig("hf:" + str(tmp_path / "saved"))))
    assert docs[0].text == "x y" and docs[0].domain == "z"


def test_missing_text_field_is_one_line_error(tmp_path):
    p = tmp_path / "c.jsonl"
    _write_jsonl(p, [{"content": "hello", "domain": "a"}])
    with pytest.raises(CorpusError, match=r"no field 'text'.*--text-field") as err:
        list(iter_documents(CorpusConfig(str(p))))
    assert "\n" not in str(err.value)


def test_empty_corpus_error(tmp_path):
    p = tmp_path / "c.jsonl"
    _write_jsonl(p, [{"text": "   ", "domain": "a"}])
    with pytest.raises(CorpusError, match="no non-empty documents"):
        list(iter_documents(CorpusConfig(str(p))))


def test_non_utf8_lines_are_skipped_and_counted(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b'{"text": "good one", "domain": "a"}\n{"text": "bad \xff\xfe", "domain": "a"}\n'
                  b'{"text": "good two", "domain": "b"}\n')
    stats = CorpusStats()
    docs = list(iter_documents(CorpusConfig(str(p), shuffle=False), stats))
    assert [d.text for d in docs] == ["good one", "good two"]
    assert stats.skipped_lines == 1


def test_missing_corpus_path(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        list(iter_documents(CorpusConfig(str(tmp_path / "nope.jsonl"))))


def test_packing_keeps_doc_ids_positions_and_bos(tiny_ckpt, corpus_jsonl):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt("olmoe"))
    docs = list(iter_documents(CorpusConfig(str(corpus_jsonl), shuffle=False)))
    b = ContextBuilder(tok, ctx=32)
    batches = list(b.batches(docs, batch_size=4))
    ids = np.concatenate([x.input_ids[x.attention_mask == 1] for x in batches])
    doc = np.concatenate([x.doc_index[x.attention_mask == 1] for x in batches])
    pos = np.concatenate([x.position[x.attention_mask == 1] for x in batches])
    # the packed stream is exactly BOS + tokens of each document, in order
    expected = []
    for d in docs:
        expected += [tok.bos_token_id] + tok(d.text, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == expected
    for di, d in enumerate(docs):
        sel = doc == di
        assert pos[sel].tolist() == list(range(sel.sum()))
        assert ids[sel][0] == tok.bos_token_id
        assert b.doc_ids[di] == d.doc_id and b.doc_domains[di] == d.domain
    # only the very last context may be short; padding is masked out
    assert all(x.attention_mask[:-1].all() for x in batches[:-1])
    ctxs = np.concatenate([x.context_index for x in batches])
    assert ctxs.tolist() == list(range(len(ctxs)))


def test_pad_mode_starts_each_document_in_a_new_context(tiny_ckpt, corpus_jsonl):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt("olmoe"))
    docs = list(iter_documents(CorpusConfig(str(corpus_jsonl), shuffle=False)))[:3]
    b = ContextBuilder(tok, ctx=512, packing="pad")
    (batch,) = list(b.batches(docs, batch_size=8))
    assert batch.input_ids.shape[0] == 3
    for row in range(3):
        real = batch.doc_index[row][batch.attention_mask[row] == 1]
        assert set(real.tolist()) == {row}
        assert (batch.doc_index[row][batch.attention_mask[row] == 0] == -1).all()


def test_streaming_shuffle_is_a_seeded_permutation(tmp_path):
    from routesae.corpus import Document, _buffered_shuffle

    items = [Document(str(i), "t", "d") for i in range(50)]
    a = [d.doc_id for d in _buffered_shuffle(items, 8, seed=1)]
    b = [d.doc_id for d in _buffered_shuffle(items, 8, seed=1)]
    c = [d.doc_id for d in _buffered_shuffle(items, 8, seed=2)]
    assert a == b != c and sorted(a, key=int) == [str(i) for i in range(50)]
    assert a != [str(i) for i in range(50)]
    # bounded: an item can come out at most `size` places earlier than it went in
    assert all(int(x) <= i + 8 for i, x in enumerate(a))


def test_txt_folder_is_fully_mixed(tmp_path):
    for domain in ("a", "b"):
        (tmp_path / domain).mkdir()
        for i in range(20):
            (tmp_path / domain / f"{i}.txt").write_text(f"{domain} {i}")
    docs = list(iter_documents(CorpusConfig(str(tmp_path), shuffle_buffer=2)))
    first_half = {d.domain for d in docs[:20]}
    assert first_half == {"a", "b"} and len(docs) == 40
