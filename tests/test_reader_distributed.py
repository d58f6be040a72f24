"""The reader in gloo processes: tp peers agree, dp ranks are disjoint, resume is exact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from dlm_pretrain.data_pipeline import TrainLoader, open_dataset

pytestmark = pytest.mark.slow  # several processes or whole runs: not in the quick subset

TP_SIZE = 2
MICRO = 8


def _loader(root: Path, dp_rank: int, dp_size: int) -> TrainLoader:
    return TrainLoader(
        root,
        open_dataset(root),
        micro_batch_size=MICRO,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=1,
        seed=3,
    )


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    return out


def _digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(b.tokens.numpy().tobytes())
    return h.hexdigest()


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _tp2_dp2(
    rank: int, world_size: int, root: Path, state_file: Path, steps: int, stop: int
) -> None:
    dp_rank, dp_size = rank // TP_SIZE, world_size // TP_SIZE
    straight = _take(_loader(root, dp_rank, dp_size), steps)
    ids = _gather(_ids(straight))
    digests = _gather(_digest(straight))
    for r in range(world_size):
        peer = r ^ 1  # the other tensor-parallel rank of the same data-parallel rank
        assert digests[r] == digests[peer], "tensor-parallel peers got different batches"
        assert ids[r] == ids[peer]
    assert not set(ids[0]) & set(ids[2]), "data-parallel ranks overlap"

    first = _loader(root, dp_rank, dp_size)
    head = _take(first, stop)
    state = first.state_dict()
    states = _gather(json.dumps(state, sort_keys=True))
    assert len(set(states)) == 1, "ranks disagree on the data position"
    resumed = _loader(root, dp_rank, dp_size)
    resumed.load_state_dict(json.loads(states[0]))
    assert _digest(head + _take(resumed, steps - stop)) == _digest(straight)
    heads = _gather(_ids(head))  # every rank joins the collective
    if rank == 0:
        state_file.write_text(states[0])
        seen = [i for dp_heads in heads[::TP_SIZE] for i in dp_heads]
        (state_file.parent / "seen.json").write_text(json.dumps(seen))


def _ids(batches) -> list[int]:
    return torch.cat([b.sample_ids for b in batches]).tolist()


def _dp3_rest(rank: int, world_size: int, root: Path, state_file: Path, n: int) -> None:
    """Finish epoch 0 on three data-parallel ranks from the position saved on two."""
    seen = json.loads((state_file.parent / "seen.json").read_text())
    loader = _loader(root, rank, world_size)
    loader.load_state_dict(json.loads(state_file.read_text()))
    steps = -(-(n - len(seen)) // (world_size * MICRO)) + 1
    rest = _gather(_ids(_take(loader, steps)))
    every = np.array(seen + [i for ids in rest for i in ids])
    first_epoch = every[every < n]
    assert len(np.unique(every)) == len(every), "a sample was read twice"
    np.testing.assert_array_equal(np.sort(first_epoch), np.arange(n))


def test_tp2_dp2_then_resume_on_dp3(dataset, tmp_path):
    n = open_dataset(dataset).splits["train"].sequences
    state_file = tmp_path / "state.json"
    run_distributed(_tp2_dp2, 4, dataset, state_file, 40, 17)
    run_distributed(_dp3_rest, 3, dataset, state_file, n)
