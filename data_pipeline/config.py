"""Configuration of dataset preparation and of the training reader.

Each field's `help` is the one description of that option: the CLI builds its flags from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dlm_pretrain.common.errors import ConfigError

# sentencepiece with byte fallback needs 256 byte pieces, the specials and some merges.
MIN_VOCAB_SIZE = 320


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """What `dlm prepare` builds: corpus -> tokenizer -> packed webdataset shards."""

    out: str = field(metadata={"help": "output dataset directory"})
    corpus: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "files or globs of .txt, .py, .jsonl, .jsonl.gz or .parquet; "
            "default: the running Python's standard library source"
        },
    )
    text_field: str = field(
        default="text", metadata={"help": "jsonl key / parquet column holding the text"}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "existing sentencepiece .model; default: train one on the corpus"},
    )
    vocab_size: int = field(
        default=8192, metadata={"help": "size of the trained tokenizer (mask included)"}
    )
    tokenizer_train_bytes: int = field(
        default=200_000_000,
        metadata={"help": "at most this many bytes of text are used to train the tokenizer"},
    )
    seq_len: int = field(default=512, metadata={"help": "tokens per packed sequence"})
    val_fraction: float = field(
        default=0.01, metadata={"help": "fraction of documents (by stable hash) for validation"}
    )
    shard_size: int = field(default=4096, metadata={"help": "sequences per shard"})
    workers: int = field(default=2, metadata={"help": "tokenizer processes"})
    strict: bool = field(
        default=False,
        metadata={"help": "fail on a bad jsonl line or an empty document instead of skipping"},
    )

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len} must be at least 2; use e.g. --seq-len 512")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(
                f"val_fraction={self.val_fraction} must be in [0, 1); use e.g. --val-fraction 0.01"
            )
        if self.shard_size < 1:
            raise ConfigError(f"shard_size={self.shard_size} must be >= 1 sequence per shard")
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers} must be >= 1")
        if self.tokenizer is None and self.vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"vocab_size={self.vocab_size} is too small for a byte-fallback tokenizer; "
                f"use --vocab-size {MIN_VOCAB_SIZE} or more"
            )
        if not self.text_field:
            raise ConfigError("text_field is empty; name the jsonl key holding the text")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How training reads a prepared dataset directory."""

    path: str = field(metadata={"help": "dataset directory written by `dlm prepare`"})
    seq_len: int | None = field(
        default=None, metadata={"help": "expected sequence length; checked against the manifest"}
    )
    tokenizer_sha256: str | None = field(
        default=None, metadata={"help": "expected tokenizer hash; checked against the manifest"}
    )
    num_workers: int = field(default=2, metadata={"help": "loader processes per rank"})
    seed: int = field(default=0, metadata={"help": "seed of the per-epoch shuffle"})

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
