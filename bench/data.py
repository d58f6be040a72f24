"""Data pipeline throughput on the embedded default corpus (the Python standard library).

    python bench/data.py [--work-dir DIR]

Prints tokens/s with 1 and 2 workers (target: 2 workers at least 1.7x one) of the
tokenization stage alone and of the whole `dlm prepare` (packing and shard writing run in the
main process, beside the workers), and the reader's sequences/s and tokens/s at seq_len 2048
with 2 loader workers (target: at least 2 M tokens/s).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from dlm_pretrain.data_pipeline import (
    PrepareConfig,
    Tokenizer,
    TrainLoader,
    open_dataset,
    prepare_dataset,
)
from dlm_pretrain.data_pipeline.corpus import default_corpus_files, list_slices
from dlm_pretrain.data_pipeline.prepare import tokenize_corpus


def time_prepare(out: Path, tokenizer: str | None, workers: int, seq_len: int) -> tuple[float, int]:
    start = time.perf_counter()
    manifest = prepare_dataset(
        PrepareConfig(out=str(out), tokenizer=tokenizer, workers=workers, seq_len=seq_len)
    )
    seconds = time.perf_counter() - start
    return seconds, sum(s.tokens for s in manifest.splits.values())


def time_tokenization(tokenizer: str, workers: int) -> tuple[float, int]:
    """The tokenization stage alone: read, hash-split and encode, results in corpus order."""
    cfg = PrepareConfig(out="unused", workers=workers)
    slices = list_slices(default_corpus_files())
    start = time.perf_counter()
    tokens = sum(
        len(t)
        for result in tokenize_corpus(slices, cfg, Tokenizer.load(tokenizer))
        for t in result.tokens.values()
    )
    return time.perf_counter() - start, tokens


def time_reader(
    root: Path, workers: int, micro_batch_size: int, seconds: float
) -> tuple[int, float]:
    manifest = open_dataset(root)
    loader = TrainLoader(
        root,
        manifest,
        micro_batch_size=micro_batch_size,
        dp_rank=0,
        dp_size=1,
        num_workers=workers,
        seed=0,
    )
    batches, start = 0, None
    for _ in loader:
        if start is None:  # the first batch pays for starting the workers
            start = time.perf_counter()
            continue
        batches += 1
        if time.perf_counter() - start > seconds:
            break
    return batches * micro_batch_size, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=None, help="where the datasets go (default: temp)")
    parser.add_argument("--read-seconds", type=float, default=20.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dlm-bench-"))

    print("tokenizer training (excluded from the rates below) ...", flush=True)
    time_prepare(work / "warm", None, 2, 512)
    tokenizer = str(work / "warm" / "tokenizer.model")
    header = (
        f"{'stage':<24} {'workers':>7} {'seconds':>8} {'tokens':>10} {'tokens/s':>10} {'vs 1':>6}"
    )
    print(header)
    for stage, run in [
        ("tokenization", lambda w: time_tokenization(tokenizer, w)),
        ("whole prepare, L=512", lambda w: time_prepare(work / f"w{w}", tokenizer, w, 512)),
    ]:
        base = None
        for workers in (1, 2):
            seconds, tokens = run(workers)
            rate = tokens / seconds
            base = base or rate
            print(
                f"{stage:<24} {workers:>7} {seconds:>8.2f} {tokens:>10} {rate:>10.0f} "
                f"{rate / base:>5.2f}x"
            )

    time_prepare(work / "l2048", tokenizer, 2, 2048)
    samples, seconds = time_reader(work / "l2048", 2, 8, args.read_seconds)
    print(
        f"\nreader, seq_len 2048, 2 workers, micro-batch 8: {samples / seconds:.0f} sequences/s, "
        f"{samples * 2048 / seconds / 1e6:.2f} M tokens/s over {seconds:.1f}s"
    )


if __name__ == "__main__":
    main()
