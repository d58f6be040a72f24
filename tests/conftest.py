"""Small corpora and prepared datasets the tests build for themselves."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

# Triton decides at import (megatron-core imports it) whether kernels are interpreted: the
# tests run the Triton kernels on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from dlm_pretrain.data_pipeline import PrepareConfig, prepare_dataset

WORDS = tuple(
    "the a model token diffusion mask noise loss train data shard epoch rank batch step sample "
    "uniform absorb schedule alpha sigma gradient parallel tensor pipeline kernel def return "
    "import class self for in if else while 0 1 2 3 42 7 x y z ( ) : = + - * ,".split(" ")
)


def random_documents(n: int, seed: int, min_words: int = 5, max_words: int = 300) -> list[str]:
    """Documents of random words and line breaks; fresh per seed, never empty."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
        docs.append("\n".join(lines))
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": hash(d) % 1000}) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    return random_documents(600, seed=1234)


def prepare_docs(root: Path, docs: list[str], vocab_size: int, val_fraction: float) -> Path:
    """`docs` prepared as a dataset of 64-token rows in shards of 40 under root/ds."""
    write_jsonl(root / "docs.jsonl", docs)
    config = PrepareConfig(
        out=str(root / "ds"),
        corpus=(str(root / "docs.jsonl"),),
        vocab_size=vocab_size,
        seq_len=64,
        shard_size=40,
        val_fraction=val_fraction,
        workers=1,
    )
    prepare_dataset(config)
    return root / "ds"


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, corpus_docs) -> Path:
    """A prepared dataset, one per session: the 600 documents as a few thousand train sequences
    of 64 tokens in shards of 40 (tests derive counts from its manifest)."""
    return prepare_docs(tmp_path_factory.mktemp("corpus"), corpus_docs, 400, 0.1)
