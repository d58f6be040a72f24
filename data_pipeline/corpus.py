"""Corpus files -> documents, read in slices that tokenizer workers can process independently.

A slice is a whole .txt/.py file (one document), a byte range of a .jsonl file (lines that
start inside it), a whole .jsonl.gz file, or one row group of a .parquet file. Slices are
listed in a fixed order, so the document order never depends on the number of workers.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow.parquet as pq
from dlm_pretrain.common.errors import DataError

TEXT_SUFFIXES = (".txt", ".py", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
JSONL_SLICE_BYTES = 16 << 20


@dataclass(frozen=True)
class Slice:
    """A piece of one corpus file: `start`/`stop` are bytes for jsonl, a row group for parquet."""

    path: str
    kind: str  # "text" | "jsonl" | "jsonl.gz" | "parquet"
    start: int
    stop: int
    size_bytes: int


@dataclass
class ReadCounts:
    """What reading skipped or repaired; summed over slices and recorded in the manifest."""

    documents: int = 0
    bad_json: int = 0
    missing_field: int = 0
    empty: int = 0
    not_utf8: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, other: ReadCounts) -> None:
        for name in ("documents", "bad_json", "missing_field", "empty", "not_utf8"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples.extend(other.examples[: max(0, 5 - len(self.examples))])

    def as_dict(self) -> dict[str, int]:
        return {
            "documents": self.documents,
            "skipped_bad_json": self.bad_json,
            "skipped_missing_field": self.missing_field,
            "skipped_empty": self.empty,
            "decoded_with_replacement": self.not_utf8,
        }


def default_corpus_files() -> list[str]:
    """The running Python's standard library source: text every machine has."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subfolders, names in os.walk(stdlib):
        subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages")]
        files.extend(os.path.join(folder, n) for n in names if n.endswith(".py"))
    return sorted(files)


def resolve_corpus(patterns: Sequence[str]) -> list[str]:
    """Expand files and globs in the given order; each pattern must match a supported file."""
    files: list[str] = []
    for pattern in patterns:
        matches = (
            sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        )
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(
                f"corpus={pattern!r} matches no file; check the path, and quote globs so "
                "the shell does not expand them"
            )
        for path in matches:
            if _kind(path) is None:
                raise DataError(
                    f"{path}: unsupported corpus file type; use .txt, .py, .md, .jsonl, "
                    ".jsonl.gz or .parquet"
                )
        files.extend(matches)
    return files


def list_slices(files: Sequence[str]) -> list[Slice]:
    """Cut the corpus files into independently readable slices, in corpus order."""
    slices: list[Slice] = []
    for path in files:
        kind = _kind(path)
        size = os.path.getsize(path)
        if kind == "jsonl":
            for start in range(0, max(size, 1), JSONL_SLICE_BYTES):
                stop = min(start + JSONL_SLICE_BYTES, size)
                slices.append(Slice(path, kind, start, stop, stop - start))
        elif kind == "parquet":
            groups = pq.ParquetFile(path).num_row_groups
            for g in range(groups):
                slices.append(Slice(path, kind, g, g + 1, max(size // max(groups, 1), 1)))
        else:
            slices.append(Slice(path, kind, 0, size, size))
    if sum(s.size_bytes for s in slices) == 0:
        raise DataError(
            f"the corpus ({len(files)} file(s)) is empty; point corpus= at files with text"
        )
    return slices


def read_documents(piece: Slice, text_field: str, strict: bool) -> tuple[list[str], ReadCounts]:
    """All non-empty documents of one slice, with counts of what was skipped or repaired."""
    counts = ReadCounts()
    docs: list[str] = []
    for where, text in _raw_records(piece, text_field, strict, counts):
        if not text.strip():
            if strict:
                raise DataError(f"{where}: empty document; remove it or drop strict to skip it")
            counts.empty += 1
            continue
        docs.append(text)
    counts.documents = len(docs)
    return docs, counts


def _kind(path: str) -> str | None:
    if path.endswith(".jsonl.gz"):
        return "jsonl.gz"
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if path.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _decode(raw: bytes, where: str, counts: ReadCounts) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        counts.not_utf8 += 1
        if len(counts.examples) < 5:
            counts.examples.append(f"{where}: not UTF-8, decoded with replacement characters")
        return raw.decode("utf-8", errors="replace")


def _raw_records(
    piece: Slice, text_field: str, strict: bool, counts: ReadCounts
) -> Iterator[tuple[str, str]]:
    if piece.kind == "text":
        with open(piece.path, "rb") as f:
            yield piece.path, _decode(f.read(), piece.path, counts)
    elif piece.kind == "parquet":
        table = pq.ParquetFile(piece.path).read_row_group(piece.start)
        if text_field not in table.column_names:
            raise DataError(
                f"{piece.path}: no column {text_field!r} (columns: {table.column_names}); "
                "pass text_field=NAME"
            )
        for i, text in enumerate(table.column(text_field).to_pylist()):
            yield f"{piece.path} row group {piece.start} row {i}", text or ""
    else:
        for where, line in _jsonl_lines(piece):
            text = _json_text(_decode(line, where, counts), where, text_field, strict, counts)
            if text is not None:
                yield where, text


def _jsonl_lines(piece: Slice) -> Iterator[tuple[str, bytes]]:
    """Lines that start inside [start, stop); a line crossing `stop` belongs to this slice."""
    if piece.kind == "jsonl.gz":
        with gzip.open(piece.path, "rb") as f:
            for n, line in enumerate(f, 1):
                yield f"{piece.path} line {n}", line
        return
    with open(piece.path, "rb") as f:
        pos = piece.start
        if pos > 0:
            f.seek(pos - 1)
            pos += len(f.readline()) - 1  # skip the line that began in the previous slice
        while pos < piece.stop:
            line = f.readline()
            if not line:
                break
            yield f"{piece.path} byte {pos}", line
            pos += len(line)


def _json_text(
    line: str, where: str, text_field: str, strict: bool, counts: ReadCounts
) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        if strict:
            raise DataError(f"{where}: not valid JSON ({e}); fix the line or drop strict") from e
        counts.bad_json += 1
        if len(counts.examples) < 5:
            counts.examples.append(f"{where}: not valid JSON, skipped")
        return None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        if strict:
            raise DataError(
                f"{where}: no string field {text_field!r}; pass text_field=NAME or drop strict"
            )
        counts.missing_field += 1
        if len(counts.examples) < 5:
            counts.examples.append(f"{where}: no string field {text_field!r}, skipped")
        return None
    return text
