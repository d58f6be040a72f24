"""Streaming micro-batches from the shards, exactly resumable, for any data-parallel layout.

Training: the S = dp_size x max(workers, 1) streams each read their share of every epoch
(data_pipeline.order); loader worker w of data-parallel rank r serves stream r*W + w, so ranks
and workers see disjoint samples, and tensor/pipeline peers (same dp_rank) see the same
batches. The position is the remaining plan of every stream: `state_dict()` after any number
of micro-batches, loaded into a new loader, continues with exactly the batches an
uninterrupted run would have seen; loaded under another layout, the remaining positions of
the epoch are re-split among the new streams, so nothing is repeated or lost.

Validation: the sequences in stored order, micro-batch j going to rank j mod dp_size, so the
set and order of sequences never depend on the number of ranks.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass, field
from multiprocessing.util import Finalize
from pathlib import Path

import numpy as np
import torch
from dlm_pretrain.common.errors import DataError
from dlm_pretrain.data_pipeline.manifest import Manifest
from dlm_pretrain.data_pipeline.order import (
    EpochOrder,
    Interval,
    drop_prefix,
    merge,
    plan_size,
    split_even,
)
from dlm_pretrain.data_pipeline.shards import read_shard
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

STATE_VERSION = 1
STOP_GRACE_S = 30  # a loader worker outlives SIGTERM this long (Slurm's default KillWait)


@dataclass(frozen=True)
class Batch:
    """One micro-batch of packed sequences.

    tokens [b, L] int64; doc_ids [b, L] int32: index of the document each token belongs to,
    counted from 0 in each sequence (for document-aware attention); sample_ids [b] int64:
    epoch * N + sequence index, unique per read of a sequence (the key of counter-based noise).
    """

    tokens: torch.Tensor
    doc_ids: torch.Tensor
    sample_ids: torch.Tensor

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader calls this in its pinning thread), so that
        `to` overlaps the host-to-device copy with compute."""
        return Batch(*(t.pin_memory() for t in astuple(self)))

    def to(self, device: torch.device) -> Batch:
        """This batch on `device`: one asynchronous copy per tensor (non_blocking takes
        effect from pinned memory)."""
        return Batch(*(t.to(device, non_blocking=True) for t in astuple(self)))


@dataclass(frozen=True)
class Layout:
    """How the streams are laid out; resuming under a different layout re-splits the epoch."""

    dp_size: int
    num_workers: int
    micro_batch_size: int

    @property
    def workers_per_rank(self) -> int:
        return max(self.num_workers, 1)

    @property
    def streams(self) -> int:
        return self.dp_size * self.workers_per_rank


@dataclass
class StreamPlan:
    """What one stream still has to read: `epochs[i]` of epoch first_epoch + i, then `fresh`
    (its share of a whole epoch) for every later epoch."""

    first_epoch: int
    epochs: list[list[Interval]]
    fresh: list[Interval]

    def intervals(self, epoch: int) -> list[Interval]:
        if epoch < self.first_epoch:
            return []
        i = epoch - self.first_epoch
        return self.epochs[i] if i < len(self.epochs) else self.fresh

    @property
    def last_explicit_epoch(self) -> int:
        return self.first_epoch + len(self.epochs) - 1

    def consume(self, count: int) -> StreamPlan:
        """The plan after reading `count` more samples."""
        epoch = self.first_epoch
        while True:
            current = self.intervals(epoch)
            if count < plan_size(current):
                rest = [self.intervals(e) for e in range(epoch + 1, self.last_explicit_epoch + 1)]
                return StreamPlan(epoch, [drop_prefix(current, count), *rest], self.fresh)
            count -= plan_size(current)
            epoch += 1


@dataclass
class _ShardCache:
    """Reads shards of one split, keeping the last one in memory."""

    root: Path
    manifest: Manifest
    split: str
    _shard: int = -1
    _samples: list = field(default_factory=list)

    def get(self, shard: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if shard != self._shard:
            info = self.manifest.splits[self.split].shards[shard]
            self._samples, self._shard = read_shard(self.root, info, self.manifest), shard
        return self._samples


def _collate(samples: Sequence[tuple[np.ndarray, np.ndarray]], sample_ids: Sequence[int]) -> Batch:
    tokens = torch.from_numpy(np.stack([t.astype(np.int64) for t, _ in samples]))
    starts = torch.zeros(tokens.shape, dtype=torch.int32)
    for row, (_, doc_starts) in enumerate(samples):
        starts[row, torch.from_numpy(doc_starts[1:].astype(np.int64))] = 1
    return Batch(tokens, torch.cumsum(starts, dim=1, dtype=torch.int32), torch.tensor(sample_ids))


class _RankStreams(IterableDataset):
    """The streams of one data-parallel rank; loader worker slot s serves stream
    (s + rotation) % W, so a resumed loader continues the round-robin where it stopped."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        seed: int,
        layout: Layout,
        plans: Sequence[StreamPlan],
        rotation: int,
    ) -> None:
        self.root, self.manifest, self.seed, self.layout = root, manifest, seed, layout
        self.plans, self.rotation = list(plans), rotation
        shards = manifest.splits["train"].shards
        self.shard_samples = tuple(s.samples for s in shards)
        self.shard_base = np.concatenate([[0], np.cumsum(self.shard_samples)])
        self.num_sequences = int(self.shard_base[-1])

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        plan = self.plans[(slot + self.rotation) % self.layout.workers_per_rank]
        samples = self._samples(plan)
        while True:
            chunk = list(itertools.islice(samples, self.layout.micro_batch_size))
            yield _collate([s for _, s in chunk], [i for i, _ in chunk])

    def _samples(self, plan: StreamPlan) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray]]]:
        cache = _ShardCache(self.root, self.manifest, "train")
        for epoch in itertools.count(plan.first_epoch):
            order = EpochOrder(self.shard_samples, self.seed, epoch)
            for shard, local in order.pieces(plan.intervals(epoch)):
                samples = cache.get(shard)
                base = epoch * self.num_sequences + int(self.shard_base[shard])
                for i in local.tolist():
                    yield base + i, samples[i]


class TrainLoader:
    """Micro-batches of the training split for one data-parallel rank, with an exact position.

    All ranks must call `state_dict()` after the same number of micro-batches (as a
    synchronous training step does); each then returns the same global state.
    """

    def __init__(
        self,
        root: str | Path,
        manifest: Manifest,
        *,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int,
        seed: int,
        pin_memory: bool = False,
    ) -> None:
        """`pin_memory`: batches come in page-locked memory, for asynchronous copies to a GPU."""
        self.root, self.manifest, self.seed, self.dp_rank = Path(root), manifest, seed, dp_rank
        self.pin_memory = pin_memory
        self.layout = Layout(dp_size, num_workers, micro_batch_size)
        self.num_sequences = manifest.splits["train"].sequences
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} is outside 0..{dp_size - 1}")
        if micro_batch_size < 1:
            raise DataError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if self.num_sequences < self.layout.streams:
            raise DataError(
                f"{root} has {self.num_sequences} training sequences, fewer than the "
                f"{self.layout.streams} reader streams (dp_size={dp_size} x workers="
                f"{self.layout.workers_per_rank}); use fewer loader workers or more data"
            )
        self._plans = self._fresh_plans(self.layout)
        self._rotation = 0
        self._consumed = 0  # micro-batches taken by this rank since _plans was set

    def __iter__(self) -> Iterator[Batch]:
        batches = self._batches()
        if self.layout.num_workers:
            # At interpreter exit multiprocessing SIGTERMs the workers of a loader still open,
            # and they outlive that by STOP_GRACE_S: an iteration nobody closed (the trainer
            # does) is closed first, which stops its workers at once. Priority 20: before the
            # loader's queues stop their feeder threads (10), which the close still needs.
            Finalize(batches, _close, args=(weakref.ref(batches),), exitpriority=20)
        return batches

    def _batches(self) -> Iterator[Batch]:
        self._plans, self._rotation = self._advanced()
        self._consumed = 0
        w = self.layout.workers_per_rank
        mine = self._plans[self.dp_rank * w : (self.dp_rank + 1) * w]
        streams = _RankStreams(
            self.root, self.manifest, self.seed, self.layout, mine, self._rotation
        )
        loader = DataLoader(
            streams,
            batch_size=None,
            num_workers=self.layout.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=_leave_stop_signals_to_the_trainer,
        )
        for batch in loader:
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        """The reader position: a few integers per stream, JSON-serialisable."""
        plans, rotation = self._advanced()
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "num_sequences": self.num_sequences,
            "layout": vars(self.layout).copy(),
            "rotation": rotation,
            "streams": [
                {"first_epoch": p.first_epoch, "epochs": p.epochs, "fresh": p.fresh} for p in plans
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; under another layout, re-split what the epoch has left."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"reader state version {state.get('version')} is not {STATE_VERSION}")
        if state["num_sequences"] != self.num_sequences or state["seed"] != self.seed:
            raise DataError(
                f"the saved reader position is for {state['num_sequences']} sequences with seed "
                f"{state['seed']}, this dataset has {self.num_sequences} with seed {self.seed}; "
                "resume with the same dataset and data seed"
            )
        plans = [
            StreamPlan(
                s["first_epoch"],
                [[tuple(i) for i in e] for e in s["epochs"]],
                [tuple(i) for i in s["fresh"]],
            )
            for s in state["streams"]
        ]
        if Layout(**state["layout"]) == self.layout:
            self._plans, self._rotation = plans, state["rotation"]
        else:
            self._plans, self._rotation = self._rebalance(plans), 0
        self._consumed = 0

    def _fresh_plans(self, layout: Layout) -> list[StreamPlan]:
        shares = split_even([(0, self.num_sequences)], layout.streams)
        return [StreamPlan(0, [], share) for share in shares]

    def _advanced(self) -> tuple[list[StreamPlan], int]:
        """Plans and rotation after the micro-batches consumed since the last fold."""
        w, b = self.layout.workers_per_rank, self.layout.micro_batch_size
        taken = [0] * w  # micro-batches per worker slot: slot m % w served batch m
        for slot in range(w):
            taken[slot] = (self._consumed - slot + w - 1) // w
        plans = [
            plan.consume(b * taken[(k % w - self._rotation) % w])
            for k, plan in enumerate(self._plans)
        ]
        return plans, (self._rotation + self._consumed) % w

    def _rebalance(self, old: Sequence[StreamPlan]) -> list[StreamPlan]:
        """Split what the old streams had left of each open epoch evenly among the new ones."""
        first = min(p.first_epoch for p in old)
        last = max(p.last_explicit_epoch for p in old)
        new_plans = self._fresh_plans(self.layout)
        for epoch in range(first, last + 1):
            remaining = merge([i for p in old for i in p.intervals(epoch)])
            for plan, share in zip(
                new_plans, split_even(remaining, self.layout.streams), strict=True
            ):
                plan.epochs.append(share)
        for plan in new_plans:
            plan.first_epoch = first
        return new_plans


def validation_batches(
    root: str | Path,
    manifest: Manifest,
    *,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    max_sequences: int | None = None,
) -> Iterator[Batch]:
    """This rank's validation micro-batches: chunk j of the stored order goes to rank j % dp_size.

    The last chunk may be short; ranks may get one chunk more than others.
    """
    split = manifest.splits["val"]
    total = split.sequences if max_sequences is None else min(max_sequences, split.sequences)
    shard_base = np.concatenate([[0], np.cumsum([s.samples for s in split.shards])])
    cache = _ShardCache(Path(root), manifest, "val")
    for start in range(dp_rank * micro_batch_size, total, dp_size * micro_batch_size):
        ids = list(range(start, min(start + micro_batch_size, total)))
        samples = []
        for i in ids:
            shard = int(np.searchsorted(shard_base, i, side="right")) - 1
            samples.append(cache.get(shard)[i - int(shard_base[shard])])
        yield _collate(samples, ids)


def _close(batches: weakref.ref) -> None:
    if (generator := batches()) is not None:
        generator.close()


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A loader worker outlives the stop signals for a while. Slurm's requeue or preemption
    sends SIGTERM to every process of the job: a worker killed by it would fail the trainer's
    step before the trainer, which got the same signal, saves. The trainer shuts its workers
    down itself; SIGTERM ends a worker only STOP_GRACE_S later, so that a SIGTERM from anyone
    else (multiprocessing's clean-up at exit) still ends it."""
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_later)


def _exit_later(sig: int, frame) -> None:
    timer = threading.Timer(STOP_GRACE_S, os._exit, (0,))
    timer.daemon = True
    timer.start()
