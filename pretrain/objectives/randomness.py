"""Counter-based randomness: every draw is a pure function of (seed, stream, key, counter).

Philox4x32-10, bit-identical to Triton's `tl.randint4x(seed, offset)` (the fused noising
kernel of a later issue draws the same numbers on the GPU). The noise a sequence receives
therefore depends only on (seed, global sample index, position), never on how the global
batch was split over ranks and micro-batches, and the first and last pipeline stages can
draw the same noise without communicating.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57

# Streams: independent draws for independent purposes under the same seed.
STREAM_TIME = 1  # t of each row of the global batch
STREAM_CORRUPT = 2  # per-token corruption
STREAM_SAMPLER = 3  # sampling steps
STREAM_ORDER = 4  # Eso-LM's order of the tokens within a sequence


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that spreads every input bit."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _signed(x: int) -> int:
    """The int64 with the bits of the uint64 x."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 tensors holding uint64 bits (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64_tensor(x: Tensor) -> Tensor:
    """_mix64 on int64 tensors, on their own device: int64 products wrap modulo 2^64, so
    the bits equal those of the uint64 arithmetic."""
    x = (x ^ _shift_right(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


def _stream_prefix(seed: int, stream: int) -> int:
    """What every key of (seed, stream) shares, mixed once on the host."""
    return _mix64(_mix64(seed & 0xFFFFFFFFFFFFFFFF) ^ stream)


def philox_key(seed: int, stream: int, key: int) -> int:
    """The 64-bit Philox key of (seed, stream, key), e.g. key = a global sample index: the
    integer definition that row_keys computes on tensors."""
    return _mix64(_stream_prefix(seed, stream) ^ (key & 0xFFFFFFFFFFFFFFFF))


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * b for a 32-bit constant a and uint32 values b in int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo = (a * b) & _M32  # int64 products wrap, the low 32 bits stay exact
    hi = (a_hi * b + ((a_lo * b) >> 16)) >> 16
    return hi, lo


def philox4x32(keys: Tensor, counters: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Four uint32 words (as int64) per (key, counter). keys int64 [...] broadcast with
    counters int64 [...] (values < 2^32). Same words as Triton's randint4x(key, counter)."""
    k0 = keys & _M32
    k1 = (keys >> 32) & _M32
    c0, c1 = counters & _M32, torch.zeros_like(counters)
    c2, c3 = torch.zeros_like(counters), torch.zeros_like(counters)
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def uniform(word: Tensor) -> Tensor:
    """uint32 word -> float32 in [0, 1), exactly as Triton's uint_to_uniform_float."""
    signed = torch.where(word >= 2**31, word - 2**32, word)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * 4.6566127342e-10


def below(word: Tensor, n: Tensor | int) -> Tensor:
    """uint32 word -> integer in [0, n) by multiply-high (n < 2^31): unbiased to 2^-32 / n."""
    return (word * n) >> 32


def row_keys(seed: int, stream: int, ids: Tensor) -> Tensor:
    """Philox key per row, philox_key(seed, stream, id) as int64, computed on ids' device (no
    host round trip in the training step). ids int64 [B] (global sample indices) -> [B]"""
    return _mix64_tensor(ids.long() ^ _signed(_stream_prefix(seed, stream)))
