"""The loss kernels' CPU twins: the same per-shard math in PyTorch over column blocks.

Besides the logits and their gradient, only a few [n, CHUNK] blocks are alive at a time
(float32; Duo's sums in float64, which they need at small t).
The math is in pretrain/kernels/losses.py; the Triton kernels (triton_backend.py) have the
same functions and are tested against these.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 512  # vocabulary columns per block


def _blocks(logits: Tensor, rows, real: Tensor):
    """(lo, block [n, hi - lo]): the selected rows' logits in float32, a copy, with -inf at
    non-real ids, over the columns."""
    for lo in range(0, logits.shape[-1], CHUNK):
        hi = min(lo + CHUNK, logits.shape[-1])
        block = logits[(*rows, slice(lo, hi))].float()  # index tensors: always a copy
        yield lo, block.masked_fill_(~real[lo:hi], float("-inf"))


def _add_at(block: Tensor, ids: Tensor, lo: int, values: Tensor) -> None:
    """block[i, ids[i] - lo] += values[i] where ids[i] falls inside this block (no
    data-dependent shapes: no host sync on a GPU)."""
    local = ids - lo
    inside = (local >= 0) & (local < block.shape[1])
    added = torch.where(inside, values, 0).to(block.dtype).unsqueeze(1)
    block.scatter_add_(1, local.clamp(0, block.shape[1] - 1).unsqueeze(1), added)


def max_sumexp(logits: Tensor, rows, real: Tensor) -> tuple[Tensor, Tensor]:
    """(shift, sum of exp(l - shift)) [n] f32 over this shard's real ids: one pass with a
    running max (kept finite, so that a block without real ids adds exp(-inf) = 0)."""
    shift = torch.full(rows[0].shape, torch.finfo(torch.float32).min, device=logits.device)
    total = torch.zeros_like(shift)
    for _, block in _blocks(logits, rows, real):
        new_shift = torch.maximum(shift, block.amax(1))
        total = total * (shift - new_shift).exp() + (block - new_shift.unsqueeze(1)).exp().sum(1)
        shift = new_shift
    return shift, total


def cross_entropy_backward(logits, rows, real, lse, targets, grad, out) -> None:
    """out[rows] = (p - one_hot(targets)) grad."""
    for lo, block in _blocks(logits, rows, real):
        block.sub_(lse.unsqueeze(1)).exp_()
        _add_at(block, targets, lo, -torch.ones_like(lse))
        out[(*rows, slice(lo, lo + block.shape[1]))] = block.mul_(grad.unsqueeze(1)).to(out.dtype)


def duo_sums(logits: Tensor, rows, real: Tensor, lse: Tensor, r: Tensor) -> Tensor:
    """[D, E] [2, n] f64 over this shard's real ids. p = exp(l - lse) in float32 (as accurate
    as the plain path's float32 log-softmax), widened to float64 for the sums that cancel."""
    sums = torch.zeros(2, len(rows[0]), dtype=torch.float64, device=logits.device)
    for _, block in _blocks(logits, rows, real):
        y = block.sub_(lse.unsqueeze(1)).exp_().double().mul_(r.unsqueeze(1))
        sums[0] += (torch.log1p(y) - y).sum(1)
        sums[1] -= (y * y / (1 + y)).sum(1)
    return sums


def duo_backward(logits, rows, real, lse, r, out, *, grad_d, common, at_x, at_z) -> None:
    """out[rows] = grad_d g'(y) y - p common + (coefficient at x) + (coefficient at z), in
    float32 (nothing cancels here)."""
    grad_d, common, r = (v.float().unsqueeze(1) for v in (grad_d, common, r))
    for lo, block in _blocks(logits, rows, real):
        p = block.sub_(lse.unsqueeze(1)).exp_()
        y = r * p
        grad = grad_d * (-y * y / (1 + y)) - p * common
        for ids, coefficient in (at_x, at_z):
            _add_at(grad, ids, lo, coefficient)
        out[(*rows, slice(lo, lo + grad.shape[1]))] = grad.to(out.dtype)
