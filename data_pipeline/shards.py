"""Packed sequences <-> webdataset tar shards.

Each sample is one packed sequence: `tokens.bin` ([L] ids in the manifest dtype) and
`doc_starts.bin` (int32 positions where a document begins; always starts with 0).
Shards are written under a temporary name and renamed when complete, so an interrupted
`dlm prepare` never leaves a half-written shard under a real name.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from dlm_pretrain.common.errors import DataError
from dlm_pretrain.data_pipeline.manifest import Manifest, ShardInfo, load_manifest
from webdataset.tariterators import group_by_keys, tar_file_expander

TOKENS = "tokens.bin"
DOC_STARTS = "doc_starts.bin"


class _HashingFile:
    """A write-only file that also hashes what passes through it."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 (closed in ShardWriter._finish)
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.file.write(data)


class ShardWriter:
    """Writes the sequences of one split into shards of `shard_size` samples."""

    def __init__(self, root: Path, split: str, shard_size: int, dtype: str) -> None:
        self.root, self.split, self.shard_size = root, split, shard_size
        self.dtype = np.dtype(dtype)
        self.shards: list[ShardInfo] = []
        self._tar: wds.TarWriter | None = None
        self._out: _HashingFile | None = None
        self._count = 0
        (root / split).mkdir(parents=True, exist_ok=True)

    def write(self, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        """tokens [L] int; doc_starts [n] int, ascending, doc_starts[0] == 0"""
        if self._tar is None:
            self._open()
        self._tar.write(
            {
                "__key__": f"{self._count:08d}",
                TOKENS: tokens.astype(self.dtype).tobytes(),
                DOC_STARTS: doc_starts.astype(np.int32).tobytes(),
            }
        )
        self._count += 1
        if self._count == self.shard_size:
            self._finish()

    def close(self) -> tuple[ShardInfo, ...]:
        if self._tar is not None:
            self._finish()
        return tuple(self.shards)

    def _name(self) -> str:
        return f"{self.split}/shard-{len(self.shards):06d}.tar"

    def _open(self) -> None:
        self._out = _HashingFile(self.root / (self._name() + ".tmp"))
        # mtime=0 and fixed owner make the tar bytes a function of the samples alone.
        self._tar = wds.TarWriter(self._out, encoder=False, mtime=0, user="dlm", group="dlm")
        self._count = 0

    def _finish(self) -> None:
        self._tar.close()
        self._out.file.flush()
        os.fsync(self._out.file.fileno())
        self._out.file.close()
        name = self._name()
        os.replace(self.root / (name + ".tmp"), self.root / name)
        self.shards.append(
            ShardInfo(name, self._count, self._out.sha256.hexdigest(), self._out.bytes)
        )
        self._tar = self._out = None


def read_shard(
    root: Path, shard: ShardInfo, manifest: Manifest
) -> list[tuple[np.ndarray, np.ndarray]]:
    """All samples of a shard, in stored order, after checking its hash and every sample.

    -> shard.samples x (tokens [L] manifest dtype, doc_starts [n] int32)
    """
    path = root / shard.file
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"shard {path} cannot be read ({e}); run `dlm verify {root}`") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        raise DataError(
            f"shard {path} is corrupt: its sha256 {digest[:12]}... differs from the manifest's "
            f"{shard.sha256[:12]}... (truncated or altered); re-run `dlm prepare`"
        )
    return _parse(path, data, shard.samples, manifest)


def _parse(path: Path, data: bytes, expected: int, manifest: Manifest) -> list:
    seq_bytes = manifest.seq_len * manifest.np_dtype.itemsize
    samples = []
    try:
        for i, sample in enumerate(
            group_by_keys(tar_file_expander([{"stream": io.BytesIO(data), "url": str(path)}]))
        ):
            tokens, starts = sample.get(TOKENS), sample.get(DOC_STARTS)
            if sample["__key__"] != f"{i:08d}" or tokens is None or len(tokens) != seq_bytes:
                raise DataError(f"shard {path}: sample {i} is malformed; re-run `dlm prepare`")
            samples.append(
                (np.frombuffer(tokens, manifest.np_dtype), np.frombuffer(starts or b"", np.int32))
            )
    except (tarfile.TarError, ValueError, OSError) as e:
        raise DataError(f"shard {path} is not a readable tar ({e}); re-run `dlm prepare`") from e
    if len(samples) != expected:
        raise DataError(
            f"shard {path} holds {len(samples)} samples, the manifest says {expected}; "
            "re-run `dlm prepare`"
        )
    return samples


def verify_dataset(root: str | Path) -> list[str]:
    """One line per bad file (tokenizer or shard: missing, wrong hash, unreadable, wrong count)."""
    root = Path(root)
    manifest = load_manifest(root)
    problems = []
    tokenizer = root / manifest.tokenizer["file"]
    if not tokenizer.is_file():
        problems.append(f"tokenizer {tokenizer} is missing")
    elif hashlib.sha256(tokenizer.read_bytes()).hexdigest() != manifest.tokenizer_sha256:
        problems.append(f"tokenizer {tokenizer} differs from the one the shards were made with")
    for split in manifest.splits.values():
        for shard in split.shards:
            try:
                read_shard(root, shard, manifest)
            except DataError as e:
                problems.append(str(e))
    return problems
