"""The fused losses, both backends (the chunked twins and the Triton kernels, interpreted on
CPU: conftest sets TRITON_INTERPRET=1), against float64 references and against the plain
PyTorch path: losses and logit gradients, on fresh random inputs with a vocabulary that is
not a multiple of the block size, t near 1e-3 and near 1, x0 == xt and x0 != xt, masked and
unmasked positions; bf16 logits within bf16 tolerance; and two tensor-parallel ranks against
one, for the kernels and for the plain path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.pretrain.kernels import KERNELS_ENV, chunked
from dlm_pretrain.pretrain.objectives import OBJECTIVES
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from test_objectives import REFERENCES

BACKENDS = ["chunked", "triton"]
PLAIN = "plain"  # the plain PyTorch path (objective.fused=false)

V, B, L = 2 * chunked.CHUNK + 78, 4, 10  # three blocks, the last one partial; even
VOCAB = Vocab.build(V, mask_id=4, never_in_data=(3, chunked.CHUNK, V - 1))


def _inputs(name: str, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, V, generator=g) * 3).to(dtype)
    x0 = VOCAB.real_ids[torch.randint(VOCAB.num_real, (B, L), generator=g)]
    others = VOCAB.real_ids[torch.randint(VOCAB.num_real, (B, L), generator=g)]
    replacement = torch.full_like(x0, VOCAB.mask_id) if name == "mdlm" else others
    xt = torch.where(torch.rand(B, L, generator=g) < 0.5, replacement, x0)
    t = torch.tensor([1.1e-3, 0.3, 0.8, 0.9995])
    return logits, x0, xt, t, torch.rand(B, L, generator=g) + 0.5


def _loss_and_grad(name, logits, x0, xt, t, weights, group=None, fused=True):
    logits = logits.clone().requires_grad_()
    loss = OBJECTIVES[name].per_token_loss(logits, x0, xt, t, VOCAB, group, fused=fused)
    (loss * weights[:, : loss.shape[1]]).sum().backward()
    return loss.detach(), logits.grad


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error per row, relative to the row's largest reference entry; rows whose
    reference is all zero (unscored tokens) must be exactly zero."""
    got, ref = got.double().flatten(0, -2), ref.double().flatten(0, -2)
    scale = ref.abs().amax(-1)
    assert torch.all(got[scale == 0] == 0)
    return ((got - ref).abs().amax(-1)[scale > 0] / scale[scale > 0]).max().item()


@pytest.fixture(params=BACKENDS)
def kernels(request, monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, request.param)
    return request.param


@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.parametrize("seed", [0, 1])
def test_kernels_match_float64_reference(kernels, name, seed):
    logits, x0, xt, t, weights = _inputs(name, seed)
    assert (xt == x0).any() and (xt != x0).any()
    loss, grad = _loss_and_grad(name, logits, x0, xt, t, weights)
    ref_logits = logits.double().requires_grad_()
    ref_loss = REFERENCES[name](ref_logits, x0, xt, t, VOCAB)
    (ref_loss * weights[:, : ref_loss.shape[1]].double()).sum().backward()
    assert _relative(loss.unsqueeze(-1), ref_loss.unsqueeze(-1)) < 1e-5
    assert _relative(grad, ref_logits.grad) < 1e-5
    assert torch.all(grad[..., ~VOCAB.real] == 0)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_kernels_equal_plain_path_and_take_bf16(kernels, name):
    logits, x0, xt, t, weights = _inputs(name, 2, torch.bfloat16)
    fused = _loss_and_grad(name, logits, x0, xt, t, weights)
    plain = _loss_and_grad(name, logits, x0, xt, t, weights, fused=False)
    assert fused[1].dtype == torch.bfloat16
    assert _relative(fused[0].unsqueeze(-1), plain[0].unsqueeze(-1)) < 1e-5
    assert _relative(fused[1].float(), plain[1].float()) < 1e-2  # bf16 rounding of the gradient


def _split(rank: int, world_size: int, path: str, out: Path) -> None:
    if path != PLAIN:
        os.environ[KERNELS_ENV] = path
    results = {}
    for name in OBJECTIVES:
        logits, *rest = _inputs(name, 3)
        shard = logits.chunk(world_size, -1)[rank]
        loss, grad = _loss_and_grad(name, shard, *rest, group=dist.group.WORLD, fused=path != PLAIN)
        parts = [torch.empty_like(grad) for _ in range(world_size)]
        dist.all_gather(parts, grad.contiguous())
        results[name] = (loss, torch.cat(parts, -1))
    if rank == 0:
        torch.save(results, out)


@pytest.mark.parametrize("path", [PLAIN, *BACKENDS])
def test_vocab_parallel_equals_unsplit(tmp_path, path):
    """Two ranks with half the vocabulary each (excluded ids in both halves) against one
    process with all of it, for the plain path and both kernel backends."""
    run_distributed(_split, 2, path, tmp_path / "tp2.pt")
    split = torch.load(tmp_path / "tp2.pt")
    for name in OBJECTIVES:
        loss, grad = _loss_and_grad(name, *_inputs(name, 3), fused=path != PLAIN)
        assert _relative(split[name][0].unsqueeze(-1), loss.unsqueeze(-1)) < 1e-5, name
        assert _relative(split[name][1], grad) < 1e-5, name


def test_unknown_backend_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "cuda")
    with pytest.raises(ConfigError, match="DLM_KERNELS='cuda'; use triton or chunked"):
        _loss_and_grad("ar", *_inputs("ar", 4))
