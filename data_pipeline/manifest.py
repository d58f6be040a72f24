"""manifest.json: what a prepared dataset directory holds, and the checks made on opening it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from dlm_pretrain.common.errors import DataError

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the dataset directory
    samples: int
    sha256: str
    bytes: int


@dataclass(frozen=True)
class SplitInfo:
    documents: int
    tokens: int  # document tokens plus one EOS each, before packing
    sequences: int
    dropped_tokens: int  # the final partial sequence, the only tokens not packed
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    format_version: int
    seq_len: int
    dtype: str
    tokenizer: dict
    corpus: dict
    val_fraction: float
    splits: dict[str, SplitInfo]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def tokenizer_sha256(self) -> str:
        return self.tokenizer["sha256"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        splits = {
            name: SplitInfo(**{**s, "shards": tuple(ShardInfo(**x) for x in s["shards"])})
            for name, s in raw.pop("splits").items()
        }
        return cls(**raw, splits=splits)


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every id (uint16 for V <= 65536)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def load_manifest(root: str | Path) -> Manifest:
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(
            f"{root} has no {MANIFEST_FILE}: it is not a finished dataset; "
            f"run `dlm prepare out={root}` (again, if it was interrupted)"
        )
    try:
        manifest = Manifest.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path} is not a valid manifest ({e}); re-run `dlm prepare`") from e
    if manifest.format_version != FORMAT_VERSION:
        raise DataError(
            f"{path} has format version {manifest.format_version}, this dlm reads "
            f"{FORMAT_VERSION}; re-run `dlm prepare` with this version"
        )
    return manifest


def open_dataset(
    root: str | Path, *, seq_len: int | None = None, tokenizer_sha256: str | None = None
) -> Manifest:
    """Load the manifest and check, before any training work, that the dataset fits the run.

    Checks: the expected seq_len and tokenizer, and that every shard file is present with the
    size the manifest records (content hashes are checked as shards are read).
    """
    manifest = load_manifest(root)
    if seq_len is not None and seq_len != manifest.seq_len:
        raise DataError(
            f"the run asks for seq_len={seq_len} but {root} was packed with seq_len="
            f"{manifest.seq_len}; set the run's seq_len to {manifest.seq_len} or re-run "
            f"`dlm prepare seq_len={seq_len}`"
        )
    if tokenizer_sha256 is not None and tokenizer_sha256 != manifest.tokenizer_sha256:
        raise DataError(
            f"the tokenizer (sha256 {tokenizer_sha256[:12]}...) does not match the one {root} "
            f"was tokenized with ({manifest.tokenizer_sha256[:12]}...); use "
            f"{Path(root) / TOKENIZER_FILE} or re-run `dlm prepare tokenizer=YOUR.model`"
        )
    for split in manifest.splits.values():
        for shard in split.shards:
            path = Path(root) / shard.file
            if not path.is_file():
                raise DataError(f"shard {path} is missing; run `dlm verify {root}`")
            if path.stat().st_size != shard.bytes:
                raise DataError(
                    f"shard {path} has {path.stat().st_size} bytes, the manifest says "
                    f"{shard.bytes}: it is truncated or altered; re-run `dlm prepare`"
                )
    return manifest
