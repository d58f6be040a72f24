"""Configuration of dataset preparation and of the training reader.

Each field's description is the one description of that option: `dlm prepare --help` and
`dlm train --help` list them (common.config.keys).
"""

from __future__ import annotations

from dlm_pretrain.common.config import Section, one_or_many
from dlm_pretrain.common.errors import ConfigError
from pydantic import Field, field_validator, model_validator

# sentencepiece with byte fallback needs 256 byte pieces, the specials and some merges.
MIN_VOCAB_SIZE = 320


class PrepareConfig(Section):
    """What `dlm prepare` builds: corpus -> tokenizer -> packed webdataset shards."""

    out: str = Field(min_length=1, description="output dataset directory")
    corpus: tuple[str, ...] = Field(
        default=(),
        description="files or globs of .txt, .py, .jsonl, .jsonl.gz or .parquet, one or "
        "[a, b]; default: the running Python's standard library source",
    )
    text_field: str = Field(
        default="text", min_length=1, description="jsonl key / parquet column holding the text"
    )
    tokenizer: str | None = Field(
        default=None, description="existing sentencepiece .model; default: train one on the corpus"
    )
    vocab_size: int = Field(
        default=8192, ge=1, description="size of the trained tokenizer (mask included)"
    )
    tokenizer_train_bytes: int = Field(
        default=200_000_000,
        ge=1,
        description="at most this many bytes of text are used to train the tokenizer",
    )
    seq_len: int = Field(default=512, ge=2, description="tokens per packed sequence")
    val_fraction: float = Field(
        default=0.01,
        ge=0,
        lt=1,
        description="fraction of documents (by stable hash) for validation",
    )
    shard_size: int = Field(default=4096, ge=1, description="sequences per shard")
    workers: int = Field(default=2, ge=1, description="tokenizer processes")
    strict: bool = Field(
        default=False,
        description="fail on a bad jsonl line or an empty document instead of skipping",
    )

    _corpus_one_or_many = field_validator("corpus", mode="before")(one_or_many)

    @model_validator(mode="after")
    def _vocabulary_fits_the_bytes(self) -> PrepareConfig:
        if self.tokenizer is None and self.vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"vocab_size={self.vocab_size} is too small for a byte-fallback tokenizer; "
                f"use vocab_size={MIN_VOCAB_SIZE} or more"
            )
        return self


class DataConfig(Section):
    """How training reads a prepared dataset directory."""

    path: str = Field(
        default="data/stdlib",
        min_length=1,
        description="dataset directory written by `dlm prepare` (default: the embedded corpus, "
        "prepared on first use)",
    )
    seq_len: int | None = Field(
        default=None, ge=2, description="expected sequence length; checked against the manifest"
    )
    tokenizer_sha256: str | None = Field(
        default=None, description="expected tokenizer hash; checked against the manifest"
    )
    num_workers: int = Field(default=1, ge=0, description="loader processes per rank")
    seed: int = Field(default=0, ge=0, description="seed of the per-epoch shuffle")
