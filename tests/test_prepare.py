"""`dlm prepare` on corpora the tests build: packing, split, determinism, formats, specials."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm
from conftest import random_documents, write_jsonl
from dlm_pretrain.data_pipeline import PrepareConfig, Tokenizer, open_dataset, prepare_dataset
from dlm_pretrain.data_pipeline.shards import read_shard


def _prepare(out: Path, corpus: list[Path], **kw) -> Path:
    cfg = dict(vocab_size=400, seq_len=64, shard_size=40, val_fraction=0.1, workers=1) | kw
    prepare_dataset(PrepareConfig(out=str(out), corpus=tuple(map(str, corpus)), **cfg))
    return out


def _sequences(root: Path, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    manifest = open_dataset(root)
    return [s for shard in manifest.splits[split].shards for s in read_shard(root, shard, manifest)]


def _documents_of(root: Path, split: str) -> list[str]:
    """Decode a split back into documents by cutting the packed stream at EOS."""
    tok = Tokenizer.load(root / "tokenizer.model")
    stream = np.concatenate([t for t, _ in _sequences(root, split)]).tolist()
    docs, current = [], []
    for i in stream:
        if i == tok.special.eos:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(i)
    return docs  # the final, partial document is cut off with the dropped tail


def test_packing_keeps_every_document_and_marks_boundaries(dataset, corpus_docs):
    manifest = open_dataset(dataset)
    eos = manifest.tokenizer["special_ids"]["eos"]
    for split in ("train", "val"):
        info = manifest.splits[split]
        assert info.sequences * manifest.seq_len + info.dropped_tokens == info.tokens
        assert 0 <= info.dropped_tokens < manifest.seq_len
        for tokens, starts in _sequences(dataset, split):
            assert len(tokens) == manifest.seq_len and starts[0] == 0
            # a document starts right after every EOS that is not the last token
            after_eos = np.flatnonzero(tokens[:-1] == eos) + 1
            np.testing.assert_array_equal(starts[1:], after_eos)
    train, val = _documents_of(dataset, "train"), _documents_of(dataset, "val")
    assert not set(train) & set(val)
    # every document is reproduced exactly; only the one cut by each split's tail is missing
    assert set(train) | set(val) <= set(corpus_docs)
    assert len(set(train) | set(val)) >= len(corpus_docs) - 2
    assert 0.04 < len(val) / len(corpus_docs) < 0.2


def test_split_is_by_document_hash_not_by_position(tmp_path):
    """The same document lands in the same split whatever else the corpus holds."""
    docs = random_documents(300, seed=7)
    a = _prepare(tmp_path / "a", [write_jsonl(tmp_path / "a.jsonl", docs)], val_fraction=0.3)
    b = _prepare(
        tmp_path / "b",
        [write_jsonl(tmp_path / "b.jsonl", docs[::-1] + random_documents(50, seed=8))],
        tokenizer=str(a / "tokenizer.model"),
        val_fraction=0.3,
    )
    val_a, val_b = set(_documents_of(a, "val")), set(_documents_of(b, "val"))
    train_b = set(_documents_of(b, "train"))
    assert len(val_a) > 50
    assert not val_a & train_b
    assert len(val_a & val_b) >= len(val_a) - 2


def test_output_is_deterministic_and_independent_of_workers(tmp_path):
    corpus = [write_jsonl(tmp_path / "c.jsonl", random_documents(400, seed=3))]
    one = _prepare(tmp_path / "one", corpus, workers=1)
    two = _prepare(tmp_path / "two", corpus, workers=2)
    assert (one / "manifest.json").read_text() == (two / "manifest.json").read_text()
    for path in sorted(one.rglob("*.tar")):
        twin = two / path.relative_to(one)
        assert (
            hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(twin.read_bytes()).digest()
        )


def test_all_corpus_formats_give_the_same_documents(tmp_path, corpus_docs):
    docs = corpus_docs[:200]
    write_jsonl(tmp_path / "a.jsonl", docs[:50])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs[50:100])
    pq.write_table(pa.table({"body": docs[100:150]}), tmp_path / "c.parquet", row_group_size=16)
    for i, d in enumerate(docs[150:]):
        (tmp_path / f"d{i:03d}.txt").write_text(d)
    mixed = _prepare(
        tmp_path / "mixed",
        [tmp_path / "a.jsonl"],
        val_fraction=0.0,
        vocab_size=400,
    )
    tok = str(mixed / "tokenizer.model")
    for name, corpus, field in [
        ("gz", [tmp_path / "b.jsonl.gz"], "body"),
        ("parquet", [tmp_path / "c.parquet"], "body"),
        ("txt", [tmp_path / "d*.txt"], "text"),
    ]:
        out = _prepare(tmp_path / name, corpus, tokenizer=tok, text_field=field, val_fraction=0.0)
        got = _documents_of(out, "train")
        expected = {"gz": docs[50:100], "parquet": docs[100:150], "txt": docs[150:]}[name]
        assert got == expected[: len(got)] and len(got) >= len(expected) - 1


def test_trained_tokenizer_has_mask_and_round_trips_text(dataset):
    tok = Tokenizer.load(dataset / "tokenizer.model")
    assert tok.mask_appended is False
    assert tok.sp.id_to_piece(tok.special.mask) == "<mask>"
    assert tok.vocab_size == tok.sp.vocab_size() == 400
    text = "def f(x):\n\treturn x  * 42  # ünïcode ✓\n\n"
    assert tok.decode(tok.encode([text])[0]) == text
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["tokenizer"]["special_ids"] == {
        "bos": 1,
        "eos": 2,
        "unk": 0,
        "pad": 3,
        "mask": tok.special.mask,
    }


def test_existing_tokenizer_without_mask_gets_it_appended(tmp_path):
    docs = random_documents(200, seed=11)
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs),
        model_prefix=str(tmp_path / "plain"),
        vocab_size=300,
        byte_fallback=True,
        minloglevel=2,
    )
    out = _prepare(tmp_path / "out", [corpus], tokenizer=str(tmp_path / "plain.model"))
    manifest = open_dataset(out)
    assert manifest.tokenizer["mask_appended"] is True
    assert manifest.tokenizer["special_ids"]["mask"] == 300
    assert manifest.tokenizer["vocab_size"] == 301
    assert manifest.tokenizer["special_ids"]["pad"] is None
    ids = np.concatenate([t for t, _ in _sequences(out, "train")])
    assert ids.max() < 300  # the data never contains the appended mask
