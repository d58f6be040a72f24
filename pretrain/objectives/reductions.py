"""Per-token statistics of the logits over the real vocabulary (ALGORITHMS.md §4.1).

Each loss is algebra on a few per-token scalars: the log-normaliser over real ids, the logit
at one or two ids, and for Duo one vocabulary-wide sum. Non-real ids get probability zero
("zero-masking"). Computed in float32 whatever the logits' dtype (pitfall P14).
"""

from __future__ import annotations

import torch
from torch import Tensor


def real_logits(logits: Tensor, real: Tensor) -> Tensor:
    """logits [B, L, V] bf16|f32, real [V] bool -> [B, L, V] f32 with -inf at non-real ids."""
    return logits.float().masked_fill(~real.to(logits.device), float("-inf"))


def log_prob_at(logits: Tensor, real: Tensor, ids: Tensor) -> Tensor:
    """log x̂_θ[ids]: logits [B, L, V], ids [B, L] int64 -> [B, L] f32 (-inf at non-real ids)."""
    masked = real_logits(logits, real)
    lse = torch.logsumexp(masked, dim=-1)
    return masked.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse
