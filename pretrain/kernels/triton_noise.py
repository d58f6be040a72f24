"""The noising kernel: xt from x0 in one pass, Philox words drawn in the kernel.

Bit-identical to pretrain.objectives.corruption's PyTorch form: tl.randint4x(key, position)
gives the words of randomness.philox4x32(key, position), the uniform and the bounded draw
use the same integer and float steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # positions per program


@triton.jit
def _corrupt_kernel(
    x0,
    keys,
    corrupt_p,
    mask_p,
    real_ids,
    out,
    length,
    num_real,
    mask_id,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    positions = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = positions < length
    w0, w1, _, _ = tl.randint4x(tl.load(keys + row), positions)
    signed = w0.to(tl.int32, bitcast=True)
    u = tl.where(signed < 0, -signed - 1, signed).to(tl.float32) * 4.6566127342e-10
    tokens = tl.load(x0 + row * length + positions, mask=inside)
    index = (w1.to(tl.uint64) * num_real) >> 32
    replacement = tl.load(real_ids + index.to(tl.int64), mask=inside)
    noised = tl.where(u < tl.load(corrupt_p + row), replacement, tokens)
    noised = tl.where(u < tl.load(mask_p + row), mask_id, noised)
    tl.store(out + row * length + positions, noised, mask=inside)


def corrupt(x0: Tensor, keys: Tensor, corrupt_p: Tensor, mask_p: Tensor, vocab) -> Tensor:
    """x0 [B, L] int64; keys [B] int64 Philox keys; corrupt_p, mask_p [B] f32 thresholds;
    vocab on x0's device."""
    x0 = x0.contiguous()
    out = torch.empty_like(x0)
    batch, length = x0.shape
    _corrupt_kernel[(batch, triton.cdiv(length, BLOCK))](
        x0,
        keys,
        corrupt_p.contiguous(),
        mask_p.contiguous(),
        vocab.real_ids,
        out,
        length,
        vocab.num_real,
        vocab.mask_id,
        BLOCK=BLOCK,
    )
    return out
