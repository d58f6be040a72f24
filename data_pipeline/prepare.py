"""`dlm prepare`: corpus -> sentencepiece -> packed webdataset shards + manifest.json.

Worker processes read and tokenize slices of the corpus; the main process packs and writes
the results in corpus order, so the output is the same for any number of workers.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import platform
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dlm_pretrain.common.errors import DataError
from dlm_pretrain.common.files import write_atomic
from dlm_pretrain.data_pipeline.config import PrepareConfig
from dlm_pretrain.data_pipeline.corpus import (
    ReadCounts,
    Slice,
    default_corpus_files,
    list_slices,
    read_documents,
    resolve_corpus,
)
from dlm_pretrain.data_pipeline.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    SPLITS,
    TOKENIZER_FILE,
    Manifest,
    SplitInfo,
    token_dtype,
)
from dlm_pretrain.data_pipeline.packing import Packer
from dlm_pretrain.data_pipeline.progress import Progress
from dlm_pretrain.data_pipeline.shards import ShardWriter
from dlm_pretrain.data_pipeline.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger(__name__)

TASK_BYTES = (
    1 << 20
)  # ~1 MB of text per worker task: small enough to balance, big enough to amortise


@dataclass
class TaskResult:
    """Tokenized documents of one task, per split: concatenated ids and per-document lengths."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    counts: ReadCounts
    size_bytes: int


def prepare_dataset(cfg: PrepareConfig) -> Manifest:
    """Build the dataset directory `cfg.out`; returns the manifest written last."""
    files = resolve_corpus(cfg.corpus) if cfg.corpus else default_corpus_files()
    slices = list_slices(files)
    out = Path(cfg.out)
    _start_fresh(out)
    tokenizer = _get_tokenizer(cfg, slices)
    write_atomic(out / TOKENIZER_FILE, tokenizer.model_bytes)
    dtype = token_dtype(tokenizer.vocab_size)

    packers = {s: Packer(cfg.seq_len, tokenizer.special.eos) for s in SPLITS}
    writers = {s: ShardWriter(out, s, cfg.shard_size, dtype) for s in SPLITS}
    counts = ReadCounts()
    progress = Progress(sum(s.size_bytes for s in slices), "tokenizing")
    for result in tokenize_corpus(slices, cfg, tokenizer):
        counts.add(result.counts)
        for split in SPLITS:
            docs = np.split(result.tokens[split], np.cumsum(result.lengths[split])[:-1])
            docs = docs if len(result.lengths[split]) else []
            for tokens, doc_starts in packers[split].add(docs):
                writers[split].write(tokens, doc_starts)
        progress.update(
            result.size_bytes,
            docs=result.counts.documents,
            tokens=sum(len(t) for t in result.tokens.values()),
        )
    progress.close()
    log.info("tokenized: %s", progress.summary())

    splits = {s: _finish_split(s, packers[s], writers[s], cfg) for s in SPLITS}
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        seq_len=cfg.seq_len,
        dtype=dtype,
        tokenizer={"file": TOKENIZER_FILE, **tokenizer.describe()},
        corpus={
            "source": list(cfg.corpus) or [f"python-stdlib-{platform.python_version()}"],
            "files": len(files),
            "bytes": sum(s.size_bytes for s in slices),
            **counts.as_dict(),
        },
        val_fraction=cfg.val_fraction,
        splits=splits,
    )
    _remove_stale_shards(out, manifest)
    write_atomic(out / MANIFEST_FILE, manifest.to_json().encode())
    _report(manifest, counts)
    return manifest


def _start_fresh(out: Path) -> None:
    """Drop the old manifest first, so an interrupted re-run leaves no finished-looking dataset."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    for tmp in out.rglob("*.tmp"):
        tmp.unlink()


def _get_tokenizer(cfg: PrepareConfig, slices: Sequence[Slice]) -> Tokenizer:
    if cfg.tokenizer is not None:
        return Tokenizer.load(cfg.tokenizer)
    log.info("training a %d-piece tokenizer on the corpus", cfg.vocab_size)
    return train_tokenizer(_training_lines(slices, cfg), cfg.vocab_size)


def _training_lines(slices: Sequence[Slice], cfg: PrepareConfig) -> Iterator[str]:
    """Lines of an evenly strided subset of slices, at most `tokenizer_train_bytes` in all."""
    total = sum(s.size_bytes for s in slices)
    stride = max(1, -(-total // cfg.tokenizer_train_bytes))
    for piece in slices[::stride]:
        docs, _ = read_documents(piece, cfg.text_field, cfg.strict)
        for doc in docs:
            yield from doc.split("\n")


def _group(slices: Sequence[Slice]) -> list[list[Slice]]:
    """Consecutive slices in tasks of about TASK_BYTES each (order kept)."""
    tasks: list[list[Slice]] = [[]]
    size = 0
    for piece in slices:
        if tasks[-1] and size + piece.size_bytes > TASK_BYTES:
            tasks.append([])
            size = 0
        tasks[-1].append(piece)
        size += piece.size_bytes
    return tasks


def tokenize_corpus(
    slices: Sequence[Slice], cfg: PrepareConfig, tokenizer: Tokenizer
) -> Iterator[TaskResult]:
    """Tokenized documents in corpus order, computed in `cfg.workers` processes (in-process
    for 1), split into train and val by document hash."""
    args = [(task, cfg, tokenizer.model_bytes) for task in _group(slices)]
    if cfg.workers == 1:
        yield from map(_tokenize_task, args)
        return
    # fork: workers start in milliseconds with every module imported. No thread runs at this
    # point (sentencepiece's trainer has joined its threads), so forking is safe.
    with multiprocessing.get_context("fork").Pool(cfg.workers) as pool:
        yield from pool.imap(_tokenize_task, args)


def _tokenize_task(args: tuple[list[Slice], PrepareConfig, bytes]) -> TaskResult:
    task, cfg, model_bytes = args
    tokenizer = Tokenizer(model_bytes)  # a few ms; keeps workers free of global state
    counts = ReadCounts()
    docs: list[str] = []
    for piece in task:
        piece_docs, piece_counts = read_documents(piece, cfg.text_field, cfg.strict)
        docs.extend(piece_docs)
        counts.add(piece_counts)
    is_val = np.array([_is_val(d, cfg.val_fraction) for d in docs], dtype=bool)
    ids = tokenizer.encode(docs)
    tokens, lengths = {}, {}
    for split, chosen in (("train", ~is_val), ("val", is_val)):
        picked = [ids[i] for i in np.flatnonzero(chosen)]
        lengths[split] = np.array([len(x) for x in picked], dtype=np.int64)
        tokens[split] = np.concatenate(picked) if picked else np.empty(0, np.int32)
    return TaskResult(tokens, lengths, counts, sum(p.size_bytes for p in task))


def _is_val(doc: str, val_fraction: float) -> bool:
    """A stable hash of the text decides the split, so a document never lands in both."""
    digest = hashlib.blake2b(doc.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


def _finish_split(split: str, packer: Packer, writer: ShardWriter, cfg: PrepareConfig) -> SplitInfo:
    shards = writer.close()
    sequences = sum(s.samples for s in shards)
    wanted = split == "train" or cfg.val_fraction > 0
    if wanted and sequences == 0:
        raise DataError(
            f"the {split} split got {packer.documents} document(s) and {packer.tokens} tokens, "
            f"less than one sequence of seq_len={cfg.seq_len} (a document is never split "
            "between train and val); add documents, lower seq_len"
            + (" or raise val_fraction" if split == "val" else "")
        )
    return SplitInfo(
        documents=packer.documents,
        tokens=packer.tokens,
        sequences=sequences,
        dropped_tokens=packer.leftover_tokens,
        shards=shards,
    )


def _remove_stale_shards(out: Path, manifest: Manifest) -> None:
    """Shards of an earlier run that this run did not rewrite."""
    keep = {s.file for split in manifest.splits.values() for s in split.shards}
    for split in SPLITS:
        for path in (out / split).glob("*.tar"):
            if f"{split}/{path.name}" not in keep:
                path.unlink()


def _report(manifest: Manifest, counts: ReadCounts) -> None:
    for name, split in manifest.splits.items():
        log.info(
            "%s: %d documents, %d tokens -> %d sequences of %d in %d shard(s); "
            "%d tokens of the final partial sequence dropped",
            name,
            split.documents,
            split.tokens,
            split.sequences,
            manifest.seq_len,
            len(split.shards),
            split.dropped_tokens,
        )
    skipped = {k: v for k, v in counts.as_dict().items() if k != "documents" and v}
    if skipped:
        log.warning("corpus problems: %s; e.g. %s", skipped, "; ".join(counts.examples))
