"""Vocabulary-parallel losses: two ranks, each holding half of the logits' columns, compute
the same per-token losses and the same logit gradients as one process holding all of them
(the all-reduced per-token scalars replace the full softmax). Fresh random inputs, gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from pretrain.objectives import OBJECTIVES
from pretrain.objectives.vocab import Vocab

V, B, L = 96, 4, 12
VOCAB = Vocab.build(V, mask_id=4, never_in_data=(3, 70, 95))  # excluded ids in both halves


def _inputs(name: str):
    g = torch.Generator().manual_seed(len(name))
    logits = torch.randn(B, L, V, generator=g) * 3
    x0 = VOCAB.real_ids[torch.randint(VOCAB.num_real, (B, L), generator=g)]
    others = VOCAB.real_ids[torch.randint(VOCAB.num_real, (B, L), generator=g)]
    replacement = torch.full_like(x0, VOCAB.mask_id) if name == "mdlm" else others
    xt = torch.where(torch.rand(B, L, generator=g) < 0.5, replacement, x0)
    t = torch.tensor([1.5e-3, 0.2, 0.7, 0.999])
    return logits, x0, xt, t, torch.rand(B, L, generator=g) + 0.5


def _loss_and_grad(name: str, logits, group):
    _, x0, xt, t, weights = _inputs(name)
    logits = logits.clone().requires_grad_()
    loss = OBJECTIVES[name].per_token_loss(logits, x0, xt, t, VOCAB, group)
    (loss * weights[:, : loss.shape[1]]).sum().backward()
    return loss.detach(), logits.grad


def _split(rank: int, world_size: int, out: Path) -> None:
    results = {}
    for name in OBJECTIVES:
        logits = _inputs(name)[0].chunk(world_size, -1)[rank]
        loss, grad = _loss_and_grad(name, logits, dist.group.WORLD)
        parts = [torch.empty_like(grad) for _ in range(world_size)]
        dist.all_gather(parts, grad.contiguous())
        results[name] = (loss, torch.cat(parts, -1))
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def split_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_parallel") / "tp2.pt"
    run_distributed(_split, 2, out)
    return torch.load(out)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_vocab_parallel_loss_equals_unsplit(split_results, name):
    loss, grad = _loss_and_grad(name, _inputs(name)[0], None)
    split_loss, split_grad = split_results[name]
    nonzero = loss != 0
    assert torch.all(split_loss[~nonzero] == 0)
    assert ((split_loss - loss).abs()[nonzero] / loss.abs()[nonzero]).max() < 1e-5
    scale = grad.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    assert ((split_grad - grad).abs() / scale).max() < 1e-5
