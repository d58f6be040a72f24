"""Documents -> fixed-length sequences, documents joined with EOS (docs/algorithms.md §7.1).

Nothing is padded and nothing is dropped except the final partial sequence of a split.
Each sequence keeps the positions where its documents start, for document-aware attention.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class Packer:
    """Accumulates documents and cuts full sequences of `seq_len` tokens."""

    def __init__(self, seq_len: int, eos_id: int) -> None:
        self.seq_len, self.eos_id = seq_len, eos_id
        self.documents = 0
        self.tokens = 0
        self._buffer = np.empty(0, dtype=np.int32)
        self._starts: list[int] = []  # document starts within _buffer

    def add(self, docs: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Append documents (each followed by EOS); yield the sequences that are now full.

        docs: n x [tokens] int32 -> (tokens [L] int32, doc_starts [k] int32) per full sequence
        """
        if not docs:
            return
        lengths = np.array([len(d) + 1 for d in docs])
        starts = len(self._buffer) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        joined = np.empty(int(lengths.sum()), dtype=np.int32)
        ends = np.cumsum(lengths)
        for doc, start, end in zip(docs, ends - lengths, ends, strict=True):
            joined[start : end - 1] = doc
        joined[ends - 1] = self.eos_id
        self._buffer = np.concatenate([self._buffer, joined])
        self._starts.extend(starts.tolist())
        self.documents += len(docs)
        self.tokens += len(joined)
        yield from self._cut()

    @property
    def leftover_tokens(self) -> int:
        """Tokens of the final partial sequence, dropped when the split ends."""
        return len(self._buffer)

    def _cut(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n_full = len(self._buffer) // self.seq_len
        if n_full == 0:
            return
        starts = np.asarray(self._starts, dtype=np.int64)
        for k in range(n_full):
            lo, hi = k * self.seq_len, (k + 1) * self.seq_len
            inside = starts[(starts > lo) & (starts < hi)] - lo
            yield self._buffer[lo:hi], np.concatenate([[0], inside]).astype(np.int32)
        cut = n_full * self.seq_len
        self._buffer = self._buffer[cut:]
        self._starts = [s - cut for s in self._starts if s >= cut]
