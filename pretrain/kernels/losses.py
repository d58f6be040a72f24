"""The losses' vocabulary statistics over vocabulary-parallel logits (docs/algorithms.md §4):
the autograd functions, one per loss, the all-reduces over the tensor group, and the choice of
backend (Triton kernels for CUDA tensors, their chunked PyTorch twins otherwise). The
objectives' per-token algebra builds on these; there is no second implementation (the tests
hold them to float64 references written from the formulas, tests/reference_losses.py).

Only per-token scalars are kept between the forward and the backward, which recomputes
each block of probabilities from the logits; no [N, V] intermediate is ever built:

    lse = log sum_j exp(l_j)          (per shard max and sum of exp, then all-reduced)
    cross-entropy: loss = lse - l_target,   dl_j = (p_j - [j = target]) g
    Duo: D = sum_j g(y_j), E = sum_j g'(y_j) y_j with y_j = r p_j, g(y) = log1p(y) - y;
         for an upstream gradient (gD, gx, gz) of (D, p_x, p_z):
         dl_j = gD g'(y_j) y_j - p_j (gD E + gx p_x + gz p_z) + gx p_x [j = x] + gz p_z [j = z]

Non-real ids get probability zero. Under tensor parallelism every per-token partial is
all-reduced over the group, here and only here; a backend computes one shard's partials.
Rows are index tensors into the leading dimensions of the logits, which may be any strided
view with contiguous columns (the head's transposed output): nothing is copied out.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.distributed as dist
from dlm_pretrain.pretrain.kernels import backend_name, chunked
from torch import Tensor
from torch.distributed import ProcessGroup

Rows = tuple[Tensor, ...]  # index tensors [n] into the leading dimensions of the logits


def backend(logits: Tensor) -> ModuleType:
    """The loss kernels for these logits (see pretrain.kernels.backend_name)."""
    if backend_name(logits) == "chunked":
        return chunked
    from dlm_pretrain.pretrain.kernels import triton_backend  # Triton is imported only when used

    return triton_backend


def all_rows(logits: Tensor) -> Rows:
    """Every position of logits [..., W], as index tensors (row-major order)."""
    grid = torch.meshgrid(
        *(torch.arange(n, device=logits.device) for n in logits.shape[:-1]), indexing="ij"
    )
    return tuple(index.flatten() for index in grid)


def _all_reduce(x: Tensor, group: ProcessGroup | None, op=dist.ReduceOp.SUM) -> Tensor:
    if group is not None and group.size() > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def shard_start(width: int, group: ProcessGroup | None) -> int:
    """First vocabulary id of this rank's shard of `width` columns."""
    return 0 if group is None else dist.get_rank(group) * width


def local_real(logits: Tensor, real: Tensor, group: ProcessGroup | None) -> Tensor:
    """This shard's slice of the [V] real mask (on the logits' device).
    logits [..., V/tp] -> [V/tp] bool"""
    width = logits.shape[-1]
    start = shard_start(width, group)
    return real[start : start + width]


def _log_normaliser(kernels, logits, rows, real, group) -> Tensor:
    """lse [n] f32 over the real ids of every shard."""
    shift, total = kernels.max_sumexp(logits, rows, real)
    top = _all_reduce(shift.clone(), group, dist.ReduceOp.MAX)
    total = _all_reduce(total * (shift - top).exp(), group)
    return total.log() + top


def _logit_at(logits: Tensor, rows: Rows, local_ids: Tensor, group) -> Tensor:
    """The float32 logit of each selected row at its id (local to this shard; out of range:
    another shard holds it). [n] -> [n]"""
    width = logits.shape[-1]
    here = (local_ids >= 0) & (local_ids < width)
    picked = logits[(*rows, local_ids.clamp(0, width - 1))].float()
    return _all_reduce(torch.where(here, picked, 0.0), group)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, real, targets, group, *rows):
        kernels = backend(logits)
        shard_real, start = local_real(logits, real, group), shard_start(logits.shape[-1], group)
        lse = _log_normaliser(kernels, logits, rows, shard_real, group)
        loss = lse - _logit_at(logits, rows, targets - start, group)
        ctx.save_for_backward(logits, shard_real, targets - start, lse, *rows)
        ctx.kernels = kernels
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, shard_real, local_targets, lse, *rows = ctx.saved_tensors
        out = torch.zeros_like(logits)  # rows not selected have no gradient
        ctx.kernels.cross_entropy_backward(logits, rows, shard_real, lse, local_targets, grad, out)
        return out, None, None, None, *(None for _ in rows)


def cross_entropy(
    logits: Tensor,
    real: Tensor,
    targets: Tensor,
    rows: Rows,
    group: ProcessGroup | None = None,
) -> Tensor:
    """-log x̂[targets] over the real ids at the selected rows.
    logits [..., V/tp] bf16|f32; rows, targets [n] -> [n] f32"""
    return _CrossEntropy.apply(logits, real, targets, group, *rows)


class _DuoStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, real, x0, xt, r, group):
        kernels = backend(logits)
        shard_real, start = local_real(logits, real, group), shard_start(logits.shape[-1], group)
        rows = all_rows(logits)
        lse = _log_normaliser(kernels, logits, rows, shard_real, group)
        sums = _all_reduce(kernels.duo_sums(logits, rows, shard_real, lse, r), group)  # D, E
        p_x = (_logit_at(logits, rows, x0 - start, group) - lse).double().exp()
        p_z = (_logit_at(logits, rows, xt - start, group) - lse).double().exp()
        ctx.save_for_backward(logits, shard_real, x0 - start, xt - start, r, lse, sums[1], p_x, p_z)
        ctx.kernels, ctx.rows = kernels, rows
        return sums[0], p_x, p_z

    @staticmethod
    def backward(ctx, grad_d, grad_x, grad_z):
        logits, shard_real, x_local, z_local, r, lse, e, p_x, p_z = ctx.saved_tensors
        out = torch.empty_like(logits)
        ctx.kernels.duo_backward(
            logits,
            ctx.rows,
            shard_real,
            lse,
            r,
            out,
            grad_d=grad_d,
            common=grad_d * e + grad_x * p_x + grad_z * p_z,
            at_x=(x_local, grad_x * p_x),
            at_z=(z_local, grad_z * p_z),
        )
        return out, None, None, None, None, None


def duo_statistics(
    logits: Tensor,
    real: Tensor,
    x0: Tensor,
    xt: Tensor,
    r: Tensor,
    group: ProcessGroup | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(D, x̂[x0], x̂[xt]) float64 for Duo's per-token algebra, differentiable.

    logits [..., V/tp] bf16|f32; x0, xt, r [...] (r = K alpha / (1 - alpha), float64)
    -> three [...] float64
    """
    flat = (x0.flatten(), xt.flatten(), r.flatten())
    d, p_x, p_z = _DuoStatistics.apply(logits, real, *flat, group)
    return d.view(x0.shape), p_x.view(x0.shape), p_z.view(x0.shape)
