"""The DiT at tensor-parallel size 2 computes the same function as one process.

Parameters are set from full-size tensors keyed by name and sliced the way megatron-core
splits them (its `partition_dim`), so both layouts hold the same model. The loss is a fixed
linear function of the full logits, evaluated on each rank's vocabulary shard and summed
over the tensor group. Tolerance 1e-5 relative: float32, different reduction orders.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from dlm_pretrain.parallel.config import AttentionSpec, ModelConfig, ParallelConfig
from dlm_pretrain.parallel.groups import Runtime, init_process_groups
from dlm_pretrain.parallel.model import build_pipeline

pytestmark = pytest.mark.slow  # several processes or whole runs: not in the quick subset

V, L, B = 128, 16, 2
ATTENTION = {  # sorted: B diffusion rows and B pairs, positions in both
    "bidirectional": AttentionSpec("bidirectional"),
    "causal": AttentionSpec("causal"),
    "sorted": AttentionSpec("sorted", diffusion_rows=True, sequential_rows=True),
}


def _full(name: str, shape: list[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * 0.1


def _run(rank: int, world_size: int, out: Path) -> None:
    """Every attention pattern, in one process group: out/{kind}.pt on rank 0."""
    groups = init_process_groups(ParallelConfig(tensor=world_size), Runtime.detect())
    for kind in ATTENTION:
        _forward_backward(rank, world_size, groups, kind, out / f"{kind}.pt")


def _forward_backward(rank: int, world_size: int, groups, kind: str, out: Path) -> None:
    cfg = ModelConfig.preset("tiny", vocab_size=V, seq_len=L, init_seed=3)
    model = build_pipeline(cfg, groups, ATTENTION[kind])
    split = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = list(p.shape)
            split[name] = getattr(p, "tensor_model_parallel", False)
            if split[name]:
                shape[p.partition_dim] *= world_size
            full = _full(name, shape)
            p.add_(full.chunk(world_size, p.partition_dim)[rank] if split[name] else full)
    g = torch.Generator().manual_seed(0)
    inputs = _inputs(ATTENTION[kind], g)
    logits = model(inputs).logits()  # [B, L, V/tp] (sorted: [2B, L, V/tp], x-halves dropped)
    weights = torch.randn(logits.shape[0], L, V, generator=g).chunk(world_size, -1)[rank]
    loss = (logits * weights).sum()
    loss.backward()
    total = torch.stack([loss.detach(), (logits * weights).abs().sum().detach()])
    dist.all_reduce(total)  # the loss and the scale of its terms
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad
        if split[name]:  # gather the shards back into the full gradient
            parts = [torch.empty_like(grad) for _ in range(world_size)]
            dist.all_gather(parts, grad.contiguous())
            grad = torch.cat(parts, p.partition_dim)
        grads[name] = grad
    if rank == 0:
        torch.save({"loss": total, "grads": grads}, out)


def _inputs(attention: AttentionSpec, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(tokens, s), or for sorted attention (tokens [3B, L], s [3B], pos_d [B, L], pos_s [B, L])
    with columns [diffusion | z-halves | x-halves]."""
    if attention.kind != "sorted":
        return torch.randint(V, (B, L), generator=g), torch.rand(B, generator=g)
    positions = [torch.stack([torch.randperm(L, generator=g) for _ in range(B)]) for _ in range(2)]
    return torch.randint(V, (3 * B, L), generator=g), torch.rand(3 * B, generator=g), *positions


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tensor_parallel")
    for world_size in (1, 2):
        (out / f"tp{world_size}").mkdir()
        run_distributed(_run, world_size, out / f"tp{world_size}")
    return out


@pytest.mark.parametrize("kind", list(ATTENTION))
def test_tp2_equals_one_process(outputs, kind):
    one = torch.load(outputs / "tp1" / f"{kind}.pt")
    two = torch.load(outputs / "tp2" / f"{kind}.pt")
    # the loss sums terms of both signs: compare against the size of its terms
    assert (one["loss"][0] - two["loss"][0]).abs() < 1e-5 * one["loss"][1]
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert (grad - two["grads"][name]).abs().max() / scale < 1e-5, name
