"""The loss kernels in Triton: one program per row, looping over the vocabulary in blocks.

Same functions as chunked.py (the math is in losses.py). Each row is addressed by its
element offset, so the logits may be any strided view whose columns are contiguous. Runs on
CUDA, and on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # vocabulary columns per step of a program
LOWEST = tl.constexpr(-3.4028234663852886e38)  # float32 min: a running max never -inf


def _row_offsets(logits: Tensor, rows) -> Tensor:
    if logits.stride(-1) != 1:
        raise ValueError("the fused losses need logits with contiguous columns")
    offsets = torch.zeros_like(rows[0])
    for index, stride in zip(rows, logits.stride()[:-1], strict=True):
        offsets += index * stride
    return offsets


@triton.jit
def _max_sumexp_kernel(logits, offsets, real, shift_out, total_out, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits + tl.load(offsets + row)
    shift = tl.full([BLOCK], LOWEST, tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for lo in range(0, width, BLOCK):
        cols = lo + tl.arange(0, BLOCK)
        ok = (cols < width) & (tl.load(real + cols, mask=cols < width, other=0) != 0)
        x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
        new_shift = tl.maximum(shift, x)
        total = total * tl.exp(shift - new_shift) + tl.exp(x - new_shift)
        shift = new_shift
    row_shift = tl.max(shift, 0)
    tl.store(shift_out + row, row_shift)
    tl.store(total_out + row, tl.sum(total * tl.exp(shift - row_shift), 0))


@triton.jit
def _cross_entropy_backward_kernel(
    logits, out, offsets, real, lse, targets, grad, width, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    offset = tl.load(offsets + row)
    row_lse, target, g = tl.load(lse + row), tl.load(targets + row), tl.load(grad + row)
    for lo in range(0, width, BLOCK):
        cols = lo + tl.arange(0, BLOCK)
        inside = cols < width
        ok = inside & (tl.load(real + cols, mask=inside, other=0) != 0)
        x = tl.load(logits + offset + cols, mask=ok, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - row_lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(out + offset + cols, (p * g).to(out.dtype.element_ty), mask=inside)


@triton.jit
def _duo_sums_kernel(logits, offsets, real, lse, r, d_out, e_out, width, BLOCK: tl.constexpr):
    """p = exp(l - lse) in float32 (as the twin), the sums that cancel in float64."""
    row = tl.program_id(0)
    base = logits + tl.load(offsets + row)
    row_lse, row_r = tl.load(lse + row), tl.load(r + row)
    d = tl.zeros([BLOCK], tl.float64)
    e = tl.zeros([BLOCK], tl.float64)
    for lo in range(0, width, BLOCK):
        cols = lo + tl.arange(0, BLOCK)
        ok = (cols < width) & (tl.load(real + cols, mask=cols < width, other=0) != 0)
        x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
        y = row_r * tl.exp(x - row_lse).to(tl.float64)
        series = y * y * (-0.5 + y * (1.0 / 3.0 - 0.25 * y))  # g(y) = log1p(y) - y, where
        d += tl.where(y < 1e-4, series, tl.log(1.0 + y) - y)  # 1 + y would round
        e -= y * y / (1.0 + y)
    tl.store(d_out + row, tl.sum(d, 0))
    tl.store(e_out + row, tl.sum(e, 0))


@triton.jit
def _duo_backward_kernel(
    logits,
    out,
    offsets,
    real,
    lse,
    r,
    grad_d,
    common,
    x_ids,
    x_coef,
    z_ids,
    z_coef,
    width,
    BLOCK: tl.constexpr,
):
    """float32, as the twin: nothing cancels in the gradient."""
    row = tl.program_id(0)
    offset = tl.load(offsets + row)
    row_lse, row_r = tl.load(lse + row), tl.load(r + row)
    gd, c = tl.load(grad_d + row), tl.load(common + row)
    x, cx = tl.load(x_ids + row), tl.load(x_coef + row)
    z, cz = tl.load(z_ids + row), tl.load(z_coef + row)
    for lo in range(0, width, BLOCK):
        cols = lo + tl.arange(0, BLOCK)
        inside = cols < width
        ok = inside & (tl.load(real + cols, mask=inside, other=0) != 0)
        x_logit = tl.load(logits + offset + cols, mask=ok, other=float("-inf")).to(tl.float32)
        p = tl.exp(x_logit - row_lse)
        y = row_r * p
        grad = -gd * y * y / (1.0 + y) - p * c
        grad += tl.where(cols == x, cx, 0.0) + tl.where(cols == z, cz, 0.0)
        tl.store(out + offset + cols, grad.to(out.dtype.element_ty), mask=inside)


def max_sumexp(logits: Tensor, rows, real: Tensor) -> tuple[Tensor, Tensor]:
    n = len(rows[0])
    shift, total = (torch.empty(n, device=logits.device) for _ in range(2))
    _max_sumexp_kernel[(n,)](
        logits,
        _row_offsets(logits, rows),
        real.to(torch.int8),
        shift,
        total,
        logits.shape[-1],
        BLOCK=BLOCK,
    )
    return shift, total


def cross_entropy_backward(logits, rows, real, lse, targets, grad, out) -> None:
    _cross_entropy_backward_kernel[(len(rows[0]),)](
        logits,
        out,
        _row_offsets(logits, rows),
        real.to(torch.int8),
        lse.contiguous(),
        targets.contiguous(),
        grad.float().contiguous(),
        logits.shape[-1],
        BLOCK=BLOCK,
    )


def duo_sums(logits: Tensor, rows, real: Tensor, lse: Tensor, r: Tensor) -> Tensor:
    sums = torch.empty(2, len(rows[0]), dtype=torch.float64, device=logits.device)
    _duo_sums_kernel[(len(rows[0]),)](
        logits,
        _row_offsets(logits, rows),
        real.to(torch.int8),
        lse.contiguous(),
        r.double().contiguous(),
        sums[0],
        sums[1],
        logits.shape[-1],
        BLOCK=BLOCK,
    )
    return sums


def duo_backward(logits, rows, real, lse, r, out, *, grad_d, common, at_x, at_z) -> None:
    (x_ids, x_coef), (z_ids, z_coef) = at_x, at_z
    _duo_backward_kernel[(len(rows[0]),)](
        logits,
        out,
        _row_offsets(logits, rows),
        real.to(torch.int8),
        lse.contiguous(),
        *(v.float().contiguous() for v in (r, grad_d, common)),
        x_ids.contiguous(),
        x_coef.float().contiguous(),
        z_ids.contiguous(),
        z_coef.float().contiguous(),
        logits.shape[-1],
        BLOCK=BLOCK,
    )
