"""Per-token statistics of vocabulary-parallel logits over the real ids (ALGORITHMS.md §4.1).

Each loss is algebra on a few per-token scalars: the log-normaliser over real ids, the logit
at one or two ids, and for Duo one vocabulary-wide sum. Under tensor parallelism each rank
holds the columns [start, start + V/tp) of the logits; the scalars are computed from that
shard and all-reduced over the tensor group (max, then sums), so the full logits are never
gathered. With `group=None` (or a group of one) the same code runs without communication.

Autograd across the shards uses megatron-core's two conjugate regions. A sum over shards
(`all_reduce_sum`) all-reduces forward and passes the gradient through: every rank computes
the same loss from the reduced scalar. A replicated value fed back into shard-local algebra
(`into_shards`, e.g. the log-normaliser inside Duo's vocabulary sum) is the identity forward
and all-reduces its gradient backward, because each shard contributes a part of it.
Non-real ids get probability zero ("zero-masking"); everything is float32 whatever the
logits' dtype (pitfall P14).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from dlm_pretrain.pretrain.kernels import losses as fused_losses
from dlm_pretrain.pretrain.kernels.losses import local_real, shard_start
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import Tensor
from torch.distributed import ProcessGroup


def _size(group: ProcessGroup | None) -> int:
    return 1 if group is None else group.size()


def real_logits(logits: Tensor, real: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """logits [..., V/tp] bf16|f32, real [V] bool -> [..., V/tp] f32 with -inf at non-real ids."""
    return logits.float().masked_fill(~local_real(logits, real, group), float("-inf"))


def all_reduce_sum(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum over the tensor group; the gradient passes through unchanged (see module doc)."""
    if _size(group) == 1:
        return x
    return reduce_from_tensor_model_parallel_region(x.clone(), group)


def into_shards(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """A replicated value used in shard-local algebra: its gradient is summed over the group."""
    if _size(group) == 1:
        return x
    return copy_to_tensor_model_parallel_region(x, group)


def all_reduce_max(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Max over the tensor group, without gradient (a shift that cancels in the log-normaliser)."""
    x = x.detach().clone()
    if _size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def log_normaliser(masked: Tensor, group: ProcessGroup | None) -> Tensor:
    """log sum_j exp(logit_j) over the real ids of all shards. masked [..., V/tp] f32 -> [...]"""
    shift = all_reduce_max(masked.amax(-1), group)
    total = all_reduce_sum((masked - shift.unsqueeze(-1)).exp().sum(-1), group)
    return total.log() + shift


def logit_at(masked: Tensor, ids: Tensor, group: ProcessGroup | None) -> Tensor:
    """The logit at `ids` (global ids), wherever its shard lives. masked [..., V/tp], ids [...]"""
    width = masked.shape[-1]
    local = ids - shard_start(width, group)
    here = (local >= 0) & (local < width)
    picked = masked.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    return all_reduce_sum(torch.where(here, picked, torch.zeros_like(picked)), group)


class _CrossEntropy(torch.autograd.Function):
    """-log softmax(logits)[target] over the real ids of a vocabulary-sharded [N, V/tp].

    The backward writes softmax - one-hot into the saved probabilities: one [N, V/tp] float32
    buffer in all, as F.cross_entropy (several times faster on CPU than autograd through
    logsumexp and gather).
    """

    @staticmethod
    def forward(ctx, logits, real, targets, group):
        x = real_logits(logits, real, group)
        width = x.shape[-1]
        x.sub_(all_reduce_max(x.amax(-1), group).unsqueeze(-1))
        local = targets - shard_start(width, group)
        here = (local >= 0) & (local < width)
        local = local.clamp(0, width - 1)
        target = x.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        x.exp_()
        sums = torch.stack([x.sum(-1), torch.where(here, target, torch.zeros_like(target))])
        if _size(group) > 1:
            dist.all_reduce(sums, group=group)  # one collective: [sum of exp, target logit]
        x.div_(sums[0].unsqueeze(-1))
        ctx.save_for_backward(x, local, here)
        ctx.input_dtype = logits.dtype
        return sums[0].log() - sums[1]

    @staticmethod
    def backward(ctx, grad):
        probs, local, here = ctx.saved_tensors
        rows = torch.arange(probs.shape[0], device=probs.device)
        probs[rows, local] -= here.to(probs.dtype)
        probs.mul_(grad.unsqueeze(-1))
        return probs.to(ctx.input_dtype), None, None, None


def cross_entropy(
    logits: Tensor, real: Tensor, targets: Tensor, group: ProcessGroup | None = None
) -> Tensor:
    """-log x̂_θ[targets] over the real ids: logits [N, V/tp], targets [N] int64 -> [N] f32."""
    return _CrossEntropy.apply(logits, real, targets, group)


def cross_entropy_at(
    logits: Tensor,
    rows: tuple[Tensor, ...],
    real: Tensor,
    targets: Tensor,
    group: ProcessGroup | None,
    fused: bool,
) -> Tensor:
    """-log x̂[targets] at `rows` (index tensors into logits' leading dimensions): the fused
    kernels read those rows in place, the plain path gathers them. targets [n] -> [n] f32"""
    if fused:
        return fused_losses.cross_entropy(logits, real, targets, rows, group)
    return cross_entropy(logits[rows], real, targets, group)
