"""The DDiT's attention patterns (docs/algorithms.md §5.2, §5.3, §5.6) on one tensor rank's
heads: rotary positions, whole sequences (bidirectional, causal, Eso-LM's sorted) and
KV-cached decoding.

q, k, v are [B, H/tp, l, d_head]; cos, sin are the rotary tables [L, d_head] for positions
0..L-1. Masks are built from L alone, so every stage and tensor rank has the same ones and
none is ever sent between stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dlm_pretrain.parallel.config import AttentionSpec
from torch import Tensor


def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin [L, d_head] float32 for rotate-half (GPT-NeoX) pairing (i, i + d_head/2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotary_at(cos: Tensor, sin: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """The tables' rows at each token's own position, for tokens out of order (Eso-LM's
    sorted slots, docs/algorithms.md §5.3). positions [B, l] int64 -> cos, sin
    [B, 1, l, d_head], broadcast over the heads by apply_rotary."""
    return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, l, d_head]; cos, sin [l, d_head] (contiguous positions) or [B, 1, l, d_head]
    (rotary_at) -> [B, H, l, d_head] in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def split_positions(
    attention: AttentionSpec, positions: Sequence[Tensor]
) -> tuple[Tensor | None, Tensor | None]:
    """A stage tuple's int64 members as (diffusion rows [b_d, L], sequential rows [b_s, L]),
    None for a row kind the run has none of (AttentionSpec)."""
    wanted = attention.diffusion_rows + attention.sequential_rows
    assert len(positions) == wanted, f"{attention} takes {wanted} positions tensors"
    present = iter(positions)
    pos_d = next(present) if attention.diffusion_rows else None
    pos_s = next(present) if attention.sequential_rows else None
    return pos_d, pos_s


def pair_mask(seq_len: int, device: torch.device) -> Tensor:
    """Which keys of cat(x-half, z-half) a z-half query sees, [L, 2L] bool
    (docs/algorithms.md §5.6): z-query i sees x-keys j < i and its own z-key, so no row is
    empty."""
    below = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril(-1)
    itself = torch.eye(seq_len, dtype=torch.bool, device=device)
    return torch.cat([below, itself], dim=1)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    attention: AttentionSpec,
    positions: Sequence[Tensor] = (),
) -> Tensor:
    """Whole sequences under the run's pattern; `positions` are the stage tuple's int64
    members (sorted attention only). -> [B, H/tp, L, d_head]"""
    if attention.kind == "sorted":
        return _sorted(q, k, v, cos, sin, *split_positions(attention, positions))
    seq = q.shape[2]
    q, k = apply_rotary(q, cos[:seq], sin[:seq]), apply_rotary(k, cos[:seq], sin[:seq])
    return F.scaled_dot_product_attention(q, k, v, is_causal=attention.kind == "causal")


def _sorted(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    pos_d: Tensor | None,
    pos_s: Tensor | None,
) -> Tensor:
    """Eso-LM's columns [diffusion b_d | z-halves b_s | x-halves b_s] (docs/algorithms.md
    §5.6), the counts read from the positions' shapes (no host sync). Diffusion rows and
    x-halves: causal over their sorted slots; z-halves: the pair mask over cat(x-half,
    z-half) keys, both halves rotated at the same positions."""
    columns = torch.cat([p for p in (pos_d, pos_s, pos_s) if p is not None])  # [B, L]
    assert columns.shape == (q.shape[0], q.shape[2]), "positions do not match the columns"
    cos, sin = rotary_at(cos, sin, columns)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    b_d = 0 if pos_d is None else pos_d.shape[0]
    parts = []
    if pos_d is not None:
        parts.append(F.scaled_dot_product_attention(q[:b_d], k[:b_d], v[:b_d], is_causal=True))
    if pos_s is not None:
        z, x = slice(b_d, b_d + pos_s.shape[0]), slice(b_d + pos_s.shape[0], None)
        keys, values = torch.cat([k[x], k[z]], dim=2), torch.cat([v[x], v[z]], dim=2)
        mask = pair_mask(q.shape[2], q.device)
        parts.append(F.scaled_dot_product_attention(q[z], keys, values, attn_mask=mask))
        parts.append(F.scaled_dot_product_attention(q[x], k[x], v[x], is_causal=True))
    return torch.cat(parts)


@dataclass
class KVCache:
    """Keys and values of one block's committed tokens for incremental decoding.
    [B, H/tp, length, d_head]"""

    k: Tensor | None = None
    v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: Tensor, v: Tensor, keep: int | None = None) -> tuple[Tensor, Tensor]:
        """The cached keys and values followed by the new ones, [B, H/tp, length + l, d_head].
        Only the first `keep` new ones (all by default) stay cached: an Eso-LM window ends
        in masks, whose keys must not outlive the call (docs/algorithms.md §9.3)."""
        k = k if self.k is None else torch.cat([self.k, k], dim=2)
        v = v if self.v is None else torch.cat([self.v, v], dim=2)
        committed = k.shape[2] if keep is None else self.length + keep
        self.k, self.v = k[:, :, :committed], v[:, :, :committed]
        return k, v


def attend_cached(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    cache: KVCache,
    positions: Tensor | None = None,
    keep: int | None = None,
) -> Tensor:
    """The next l tokens see every cached key and, causally, each other (AR decoding;
    Eso-LM's windows, docs/algorithms.md §9.3). They sit at positions cache.length.., or at
    `positions` [B, l] int64; `keep` as in KVCache.append. -> [B, H/tp, l, d_head]"""
    seq, start = q.shape[2], cache.length
    if positions is None:
        cos, sin = cos[start : start + seq], sin[start : start + seq]
    else:
        cos, sin = rotary_at(cos, sin, positions)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v = cache.append(k, v, keep)
    mask = torch.ones(seq, start + seq, dtype=torch.bool, device=q.device).tril(start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
