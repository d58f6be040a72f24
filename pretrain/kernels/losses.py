"""The head and the losses fused (docs/algorithms.md §4.8): logits only at the rows a loss
reads, a block of rows at a time, never [tokens, V/tp] at once.

A loss names its rows and its per-row terms (CrossEntropyTerms: AR, MDLM, Eso-LM;
StatisticsTerms: Duo and GIDD). For each block of rows the head's matmul gives the block's
logits [rows, V/tp] in the compute dtype; the vocabulary statistics are read from it, then,
in training, the block is overwritten by the loss's gradient with respect to it and the two
gradient matmuls consume it before the next block. The per-shard statistics and gradients
are the backend's kernels (Triton on CUDA, their chunked PyTorch twins elsewhere):

    lse = log sum_j exp(l_j)          (per shard max and sum of exp, then all-reduced)
    cross-entropy: loss = lse - l_target,   dl_j = (p_j - [j = target]) g
    Duo: D = sum_j g(y_j), E = sum_j g'(y_j) y_j with y_j = r p_j, g(y) = log1p(y) - y;
         for an upstream gradient (gD, gx, gz) of (D, p_x, p_z):
         dl_j = gD g'(y_j) y_j - p_j (gD E + gx p_x + gz p_z) + gx p_x [j = x] + gz p_z [j = z]

The training loss is the mean over the micro-batch's tokens, the last thing computed, so
each row's upstream gradient g is known in the forward: the gradients are computed there,
with the block's logits still in hand, and the backward only scales them by the incoming
scalar. (Recomputing the logits in the backward instead would cost a third head matmul
per row.) Non-real ids get probability zero. Under tensor parallelism every per-row partial
is all-reduced over the group, here and only here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist
from dlm_pretrain.parallel.head import HeadInput, head_logits
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


def all_rows(shape: tuple[int, ...], device: torch.device) -> Rows:
    """Every position of a [*shape] grid, as index tensors (row-major order)."""
    grid = torch.meshgrid(*(torch.arange(n, device=device) for n in shape), indexing="ij")
    return tuple(index.flatten() for index in grid)


def _all_reduce(x: Tensor, group: ProcessGroup | None, op=dist.ReduceOp.SUM) -> Tensor:
    if group is not None and group.size() > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def shard_start(width: int, group: ProcessGroup | None) -> int:
    """First vocabulary id of this rank's shard of `width` columns."""
    return 0 if group is None else dist.get_rank(group) * width


def local_real(width: int, real: Tensor, group: ProcessGroup | None) -> Tensor:
    """This shard's slice of `width` columns of the [V] real mask -> [V/tp] bool"""
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


@dataclass(frozen=True)
class CrossEntropyTerms:
    """loss_i = CE_i / divisor_i at `rows` (index tensors into the head's [B, L])."""

    rows: Rows
    targets: Tensor  # [n] int64
    divisor: Tensor  # [n] f32

    def part(self, block: slice) -> CrossEntropyTerms:
        return CrossEntropyTerms(
            tuple(r[block] for r in self.rows), self.targets[block], self.divisor[block]
        )

    def losses(self, kernels, logits, real, group, start, scale) -> Tensor:
        """[c] f32 from the block's logits; with `scale` (1 / tokens) the block is overwritten
        by d(scale · sum of the losses)/d logits."""
        rows = (torch.arange(len(logits), device=logits.device),)
        lse = _log_normaliser(kernels, logits, rows, real, group)
        local = self.targets - start
        loss = (lse - _logit_at(logits, rows, local, group)) / self.divisor
        if scale is not None:
            grad = scale / self.divisor
            kernels.cross_entropy_backward(logits, rows, real, lse, local, grad, logits)
        return loss


@dataclass(frozen=True)
class StatisticsTerms:
    """loss_i = combine(D_i, x̂_i[x_i], x̂_i[z_i], r=r_i, **params_i) at `rows`: the
    vocabulary-wide statistics of Duo's algebra with y = r x̂ (see the module); `combine`
    is the objective's per-row algebra, float64."""

    rows: Rows
    x_ids: Tensor  # [n] int64
    z_ids: Tensor  # [n] int64
    r: Tensor  # [n] f64
    params: dict[str, Tensor]  # each [n]
    combine: Callable[..., Tensor]

    def part(self, block: slice) -> StatisticsTerms:
        return StatisticsTerms(
            tuple(r[block] for r in self.rows),
            self.x_ids[block],
            self.z_ids[block],
            self.r[block],
            {k: v[block] for k, v in self.params.items()},
            self.combine,
        )

    def losses(self, kernels, logits, real, group, start, scale) -> Tensor:
        rows = (torch.arange(len(logits), device=logits.device),)
        lse = _log_normaliser(kernels, logits, rows, real, group)
        d, e = _all_reduce(kernels.duo_sums(logits, rows, real, lse, self.r), group)
        x_local, z_local = self.x_ids - start, self.z_ids - start
        p_x = (_logit_at(logits, rows, x_local, group) - lse).double().exp()
        p_z = (_logit_at(logits, rows, z_local, group) - lse).double().exp()
        if scale is None:
            return self.combine(d, p_x, p_z, r=self.r, **self.params).float()
        with torch.enable_grad():
            stats = [v.requires_grad_() for v in (d, p_x, p_z)]
            loss = self.combine(*stats, r=self.r, **self.params)
            g_d, g_x, g_z = torch.autograd.grad(loss.sum() * scale, stats)
        kernels.duo_backward(
            logits,
            rows,
            real,
            lse,
            self.r,
            logits,
            grad_d=g_d,
            common=g_d * e + g_x * p_x + g_z * p_z,
            at_x=(x_local, g_x * p_x),
            at_z=(z_local, g_z * p_z),
        )
        return loss.detach().float()


Terms = CrossEntropyTerms | StatisticsTerms
BLOCK_BYTES = 64 * 2**20  # a block of rows' logits, float32 [rows, V/tp], stays under this


def rows_per_block(width: int) -> int:
    return max(1, BLOCK_BYTES // (4 * width))


def row_losses(head: HeadInput, terms: Terms, real: Tensor) -> Tensor:
    """Each row's loss, [n] f32, without gradients (validation, evaluation)."""
    with torch.no_grad():
        return _fused(head, terms, real, tokens=None)[0]


def mean_loss(head: HeadInput, terms: Terms, real: Tensor, tokens: int) -> Tensor:
    """sum of the rows' losses / `tokens`, a scalar f32 differentiable in the head's input
    and parameters (the training loss)."""
    return _MeanLoss.apply(head.hidden, head.weight, head.bias, head, terms, real, tokens)


class _MeanLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, head, terms, real, tokens):
        loss, grads = _fused(head, terms, real, tokens)
        ctx.save_for_backward(*grads)
        return loss.double().sum().div(tokens).float()

    @staticmethod
    def backward(ctx, grad):
        scaled = (g * grad.to(g.dtype) for g in ctx.saved_tensors)
        return *scaled, None, None, None, None


def _fused(head: HeadInput, terms: Terms, real: Tensor, tokens: int | None):
    """(row losses [n] f32, and with `tokens` the gradients of their sum / tokens with respect
    to hidden, weight and bias), a block of rows at a time (see the module)."""
    hidden, group = head.hidden.detach(), head.group
    dtype = hidden.dtype
    weight, bias = head.weight.detach().to(dtype), head.bias.detach().to(dtype)
    kernels = backend(hidden)
    width = weight.shape[0]
    shard_real, start = local_real(width, real, group), shard_start(width, group)
    index = head.index(terms.rows)
    inputs = hidden[index]  # [n, d], a copy (index tensors)
    n, scale = len(inputs), None if tokens is None else 1.0 / tokens
    losses = []
    if scale is not None:
        grad_inputs = torch.zeros(inputs.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(head.weight.shape, dtype=torch.float32, device=hidden.device)
        grad_bias = torch.zeros(head.bias.shape, dtype=torch.float32, device=hidden.device)
    step = rows_per_block(width)
    for lo in range(0, n, step):
        block = slice(lo, lo + step)
        logits = head_logits(inputs[block], weight, bias)  # [c, V/tp]
        losses.append(terms.part(block).losses(kernels, logits, shard_real, group, start, scale))
        if scale is not None:  # logits now hold the gradient with respect to themselves
            grad_inputs[block] = (logits @ weight).float()
            grad_weight += (logits.t() @ inputs[block]).float()
            grad_bias += logits.float().sum(0)
    loss = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)
    if scale is None:
        return loss, ()
    # contiguous, as HeadInput requires of the hidden's gradient
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_hidden = grad_hidden.index_put_(index, grad_inputs).to(dtype)
    return loss, (grad_hidden, grad_weight, grad_bias)
