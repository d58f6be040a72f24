"""The streaming reader: disjoint, complete epochs; exact resume; re-split under a new layout."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from dlm_pretrain.data_pipeline import TrainLoader, open_dataset, validation_batches
from dlm_pretrain.data_pipeline.order import drop_prefix, merge, split_even
from dlm_pretrain.data_pipeline.reader import STOP_GRACE_S


def _loader(dataset, *, dp_rank=0, dp_size=1, workers=0, micro=8, seed=0) -> TrainLoader:
    return TrainLoader(
        dataset,
        open_dataset(dataset),
        micro_batch_size=micro,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=workers,
        seed=seed,
    )


def _take(loader: TrainLoader, n: int) -> list:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _digest(batches) -> list[str]:
    return [
        hashlib.sha256(b.tokens.numpy().tobytes() + b.sample_ids.numpy().tobytes()).hexdigest()
        for b in batches
    ]


def test_split_even_and_drop_prefix_cover_exactly():
    rng = np.random.default_rng(0)
    plan = merge([(int(a), int(a + rng.integers(1, 20))) for a in rng.integers(0, 500, 30)])
    total = sum(b - a for a, b in plan)
    for parts in (1, 3, 7, 64):
        pieces = split_even(plan, parts)
        sizes = [sum(b - a for a, b in p) for p in pieces]
        assert sum(sizes) == total and max(sizes) - min(sizes) <= 1
        positions = [x for p in pieces for a, b in p for x in range(a, b)]
        assert positions == [x for a, b in plan for x in range(a, b)]
    k = total // 3
    rest = [x for a, b in drop_prefix(plan, k) for x in range(a, b)]
    assert rest == [x for a, b in plan for x in range(a, b)][k:]


@pytest.mark.parametrize(("dp_size", "workers"), [(1, 0), (2, 2), (3, 1)])
def test_each_epoch_reads_every_sequence_once_across_ranks_and_workers(dataset, dp_size, workers):
    n = open_dataset(dataset).splits["train"].sequences
    micro = 8
    # two epochs, plus slack for streams whose share is one sample longer
    per_rank = -(-2 * n // (dp_size * micro)) + 2 * max(workers, 1)
    ids = []
    for rank in range(dp_size):
        batches = _take(
            _loader(dataset, dp_rank=rank, dp_size=dp_size, workers=workers, micro=micro), per_rank
        )
        ids.append(torch.cat([b.sample_ids for b in batches]).numpy())
    ranks = [set(x.tolist()) for x in ids]
    for a in range(dp_size):
        for b in range(a + 1, dp_size):
            assert not ranks[a] & ranks[b], "two ranks read the same sample"
    every = np.concatenate(ids)
    assert len(np.unique(every)) == len(every), "a sample was read twice"
    for epoch in (0, 1):
        got = np.sort(every[every // n == epoch] % n)
        np.testing.assert_array_equal(got, np.arange(n))


def test_epochs_have_their_own_deterministic_shuffle(dataset):
    n = open_dataset(dataset).splits["train"].sequences
    first = torch.cat([b.sample_ids for b in _take(_loader(dataset), 2 * n // 8)])
    again = torch.cat([b.sample_ids for b in _take(_loader(dataset), 2 * n // 8)])
    other_seed = torch.cat([b.sample_ids for b in _take(_loader(dataset, seed=1), n // 8)])
    assert torch.equal(first, again)
    e0, e1 = first[: n // 2] % n, first[n : n + n // 2] % n
    assert not torch.equal(e0, e1)
    assert not torch.equal(first[: n // 8], other_seed[: n // 8])


def test_batches_carry_tokens_and_document_ids(dataset):
    manifest = open_dataset(dataset)
    eos = manifest.tokenizer["special_ids"]["eos"]
    (batch,) = _take(_loader(dataset, micro=4), 1)
    assert batch.tokens.shape == (4, 64) and batch.tokens.dtype == torch.int64
    for tokens, doc_ids in zip(batch.tokens, batch.doc_ids, strict=True):
        new_doc = torch.nonzero(doc_ids[1:] != doc_ids[:-1]).flatten()
        assert torch.all(tokens[new_doc] == eos)  # a document starts right after EOS
        assert doc_ids[0] == 0 and torch.all(doc_ids[1:] - doc_ids[:-1] >= 0)


@pytest.mark.parametrize(
    ("workers", "stop"), [(0, "early"), (2, "early"), (3, "mid-epoch"), (2, "next epoch")]
)
def test_resume_gives_exactly_the_uninterrupted_batches(dataset, workers, stop):
    """Stopped after a few micro-batches, in the middle of the first epoch or just into the
    second, and resumed: the batches of an uninterrupted read through the epoch's end."""
    epoch = -(-open_dataset(dataset).splits["train"].sequences // 8)  # micro-batches of 8
    stop = {"early": 5 + workers, "mid-epoch": epoch // 2 + 1, "next epoch": epoch + 2}[stop]
    total = epoch + 17
    straight = _digest(_take(_loader(dataset, workers=workers), total))
    first = _loader(dataset, workers=workers)
    head = _take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = _loader(dataset, workers=workers)
    resumed.load_state_dict(state)
    tail = _take(resumed, total - stop)
    assert _digest(head) + _digest(tail) == straight


def test_resume_on_another_layout_loses_and_repeats_nothing(dataset):
    """dp=2 x 2 workers, stopped mid-epoch, resumed on dp=3 x 1 worker, then dp=1."""
    n = open_dataset(dataset).splits["train"].sequences
    seen = []

    def run(dp_size, workers, steps, state):
        loaders = [
            _loader(dataset, dp_rank=r, dp_size=dp_size, workers=workers) for r in range(dp_size)
        ]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
            seen.extend(torch.cat([b.sample_ids for b in _take(loader, steps)]).tolist())
        states = [json.dumps(loader.state_dict(), sort_keys=True) for loader in loaders]
        assert len(set(states)) == 1, "ranks disagree on the global position"
        return json.loads(states[0])

    state = run(2, 2, 13, None)
    state = run(3, 1, 9, state)
    run(1, 0, -(-(n + 40 - len(seen)) // 8), state)  # through the end of epoch 0 and beyond
    seen = np.array(seen)
    assert len(np.unique(seen)) == len(seen), "a sample was read twice"
    np.testing.assert_array_equal(np.sort(seen[seen < n]), np.arange(n))


def test_validation_order_is_independent_of_the_number_of_ranks(dataset):
    manifest = open_dataset(dataset)
    m = manifest.splits["val"].sequences

    def global_order(dp_size, micro):
        per_rank = [
            list(
                validation_batches(
                    dataset, manifest, micro_batch_size=micro, dp_rank=r, dp_size=dp_size
                )
            )
            for r in range(dp_size)
        ]
        chunks = [None] * sum(len(p) for p in per_rank)
        for r, batches in enumerate(per_rank):
            for i, b in enumerate(batches):
                chunks[i * dp_size + r] = b
        return torch.cat([c.sample_ids for c in chunks]), torch.cat([c.tokens for c in chunks])

    ids1, tokens1 = global_order(1, 8)
    assert torch.equal(ids1, torch.arange(m))
    for dp_size in (2, 3):
        ids, tokens = global_order(dp_size, 8)
        assert torch.equal(ids, ids1) and torch.equal(tokens, tokens1)


def test_layout_that_cannot_be_served_is_refused(dataset):
    from dlm_pretrain.common.errors import DataError

    n = open_dataset(dataset).splits["train"].sequences
    with pytest.raises(DataError, match="fewer than the"):
        _loader(dataset, dp_size=n, workers=2)


def test_an_iteration_left_open_does_not_hold_up_the_exit(dataset):
    """Workers outlive SIGTERM by STOP_GRACE_S (for Slurm's requeue), and multiprocessing's
    exit clean-up SIGTERMs the workers of a loader nobody closed: the reader closes it first,
    so the process exits at once instead of STOP_GRACE_S later."""
    script = (
        "import sys, time\n"
        "from dlm_pretrain.data_pipeline import TrainLoader, open_dataset\n"
        f"root = {str(dataset)!r}\n"
        "loader = TrainLoader(root, open_dataset(root), micro_batch_size=8, dp_rank=0,"
        " dp_size=1, num_workers=2, seed=0)\n"
        "batches = iter(loader)\n"
        "next(batches)\n"
        "print(time.monotonic(), flush=True)\n"
    )
    started = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    exit_s = time.monotonic() - float(started.stdout.split()[-1])
    assert exit_s < STOP_GRACE_S / 3, f"the exit took {exit_s:.1f} s after the last batch"
