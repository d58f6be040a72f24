"""Memory-lean losses over vocabulary-parallel logits: the CPU twins of the fused kernels.

The logits [N, V/tp] are read in column chunks; besides the logits and their gradient only
a few [N, chunk] blocks are alive at a time (float32 for the cross-entropy, float64 for
Duo's vocabulary sums, which need it at small t). Only per-token scalars are kept between
the forward and the backward, which recomputes each block from the logits:

    lse = log sum_j exp(l_j)          (online over the chunks, then max/sum all-reduces)
    cross-entropy: loss = lse - l_target,   dl_j = (p_j - [j = target]) g
    Duo: D = sum_j g(y_j), E = sum_j g'(y_j) y_j with y_j = r p_j, g(y) = log1p(y) - y;
         for an upstream gradient (gD, gx, gz) of (D, p_x, p_z):
         dl_j = gD g'(y_j) y_j - p_j (gD E + gx p_x + gz p_z) + gx p_x [j = x] + gz p_z [j = z]

Non-real ids get probability zero. Under tensor parallelism every per-token sum is
all-reduced over the group (ALGORITHMS.md §4.1; pretrain/objectives/reductions.py holds
the plain PyTorch path with the same results).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

CHUNK = 512  # vocabulary columns per block


def _all_reduce(x: Tensor, group: ProcessGroup | None, op=dist.ReduceOp.SUM) -> Tensor:
    if group is not None and group.size() > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


Rows = tuple[Tensor, ...]  # index tensors [n] into the leading dimensions of the logits


def all_rows(logits: Tensor) -> Rows:
    """Every position of logits [..., W], as index tensors (row-major order)."""
    grid = torch.meshgrid(*(torch.arange(n, device=logits.device) for n in logits.shape[:-1]),
                          indexing="ij")  # fmt: skip
    return tuple(index.flatten() for index in grid)


def _blocks(logits: Tensor, rows: Rows, real: Tensor, dtype: torch.dtype = torch.float32):
    """(lo, hi, block [n, hi - lo]): the selected rows' logits in dtype, a copy, with -inf at
    non-real ids, over the columns. logits may be any strided view: nothing else is copied."""
    for lo in range(0, logits.shape[-1], CHUNK):
        hi = min(lo + CHUNK, logits.shape[-1])
        block = logits[(*rows, slice(lo, hi))].to(dtype)
        yield lo, hi, block.masked_fill_(~real[lo:hi], float("-inf"))


def _local_real(logits: Tensor, real: Tensor, group: ProcessGroup | None) -> tuple[Tensor, int]:
    """This shard's slice of the [V] real mask, and its first global id."""
    width = logits.shape[-1]
    start = 0 if group is None else dist.get_rank(group) * width
    return real[start : start + width].to(logits.device), start


def log_normaliser(logits: Tensor, rows: Rows, real: Tensor, group: ProcessGroup | None) -> Tensor:
    """lse [n] f32 of the selected rows over the real ids of every shard: one pass with a
    running max (kept finite, so that a block without real ids adds exp(-inf) = 0)."""
    lowest = torch.finfo(torch.float32).min
    shift = torch.full(rows[0].shape, lowest, device=logits.device)
    total = torch.zeros_like(shift)
    for _, _, block in _blocks(logits, rows, real):
        new_shift = torch.maximum(shift, block.amax(1))
        total = total * (shift - new_shift).exp() + (block - new_shift.unsqueeze(1)).exp().sum(1)
        shift = new_shift
    top = _all_reduce(shift.clone(), group, dist.ReduceOp.MAX)
    total = _all_reduce(total * (shift - top).exp(), group)
    return total.log() + top


def logit_at(
    logits: Tensor, rows: Rows, ids: Tensor, start: int, group: ProcessGroup | None
) -> Tensor:
    """The float32 logit of each selected row at its global id, from whichever shard holds it.
    ids [n] -> [n]"""
    width = logits.shape[-1]
    local = ids - start
    here = (local >= 0) & (local < width)
    picked = logits[(*rows, local.clamp(0, width - 1))].float()
    return _all_reduce(torch.where(here, picked, 0.0), group)


def _subtract_at(block: Tensor, ids: Tensor, lo: int, values: Tensor) -> None:
    """block[n, ids[n] - lo] -= values[n] where ids[n] falls inside this block."""
    local = ids - lo
    inside = (local >= 0) & (local < block.shape[1])
    rows = inside.nonzero(as_tuple=True)[0]
    block[rows, local[rows]] -= values[rows].to(block.dtype)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, real, targets, group, *rows):
        local_real, start = _local_real(logits, real, group)
        lse = log_normaliser(logits, rows, local_real, group)
        loss = lse - logit_at(logits, rows, targets, start, group)
        ctx.save_for_backward(logits, local_real, targets - start, lse, *rows)
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, local_real, local_targets, lse, *rows = ctx.saved_tensors
        out = torch.zeros_like(logits)  # rows not selected have no gradient
        for lo, hi, block in _blocks(logits, rows, local_real):
            block.sub_(lse.unsqueeze(1)).exp_()  # p_j
            _subtract_at(block, local_targets, lo, torch.ones_like(lse))
            out[(*rows, slice(lo, hi))] = block.mul_(grad.unsqueeze(1)).to(out.dtype)
        return out, None, None, None, *(None for _ in rows)


def cross_entropy(
    logits: Tensor, real: Tensor, targets: Tensor, rows: Rows, group: ProcessGroup | None = None
) -> Tensor:
    """-log x̂[targets] over the real ids at the selected rows, read in place.
    logits [..., V/tp] bf16|f32 (any strides); rows, targets [n] -> [n] f32"""
    return _CrossEntropy.apply(logits, real, targets, group, *rows)


class _DuoStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, real, x0, xt, r, group):
        local_real, start = _local_real(logits, real, group)
        rows = all_rows(logits)
        lse = log_normaliser(logits, rows, local_real, group)
        sums = torch.zeros(2, len(rows[0]), dtype=torch.float64, device=logits.device)
        for _, _, block in _blocks(logits, rows, local_real, torch.float64):
            y = block.sub_(lse.double().unsqueeze(1)).exp_().mul_(r.unsqueeze(1))
            sums[0] += (torch.log1p(y) - y).sum(1)  # D
            sums[1] -= (y * y / (1 + y)).sum(1)  # E = sum g'(y) y
        _all_reduce(sums, group)
        p_x = (logit_at(logits, rows, x0, start, group) - lse).double().exp()
        p_z = (logit_at(logits, rows, xt, start, group) - lse).double().exp()
        ctx.save_for_backward(logits, local_real, x0 - start, xt - start, r, lse, sums[1], p_x, p_z)
        ctx.rows = rows
        return sums[0], p_x, p_z

    @staticmethod
    def backward(ctx, grad_d, grad_x, grad_z):
        logits, local_real, x_local, z_local, r, lse, e, p_x, p_z = ctx.saved_tensors
        common = (grad_d * e + grad_x * p_x + grad_z * p_z).unsqueeze(1)
        out = torch.empty_like(logits)
        for lo, hi, block in _blocks(logits, ctx.rows, local_real, torch.float64):
            p = block.sub_(lse.double().unsqueeze(1)).exp_()
            y = r.unsqueeze(1) * p
            grad = grad_d.unsqueeze(1) * (-y * y / (1 + y)) - p * common
            _subtract_at(grad, x_local, lo, -grad_x * p_x)
            _subtract_at(grad, z_local, lo, -grad_z * p_z)
            out[(*ctx.rows, slice(lo, hi))] = grad.to(out.dtype)
        return out, None, None, None, None, None


def duo_statistics(
    logits: Tensor, real: Tensor, x0: Tensor, xt: Tensor, r: Tensor, group=None
) -> tuple[Tensor, Tensor, Tensor]:
    """(D, x̂[x0], x̂[xt]) float64 for Duo's per-token algebra, differentiable.

    logits [..., V/tp] bf16|f32 (any strides); x0, xt, r [...] (r = K alpha / (1 - alpha),
    float64) -> three [...] float64
    """
    d, p_x, p_z = _DuoStatistics.apply(logits, real, x0.flatten(), xt.flatten(), r.flatten(), group)
    return d.view(x0.shape), p_x.view(x0.shape), p_z.view(x0.shape)
