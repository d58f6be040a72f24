"""Per-token corruption draws, keyed by (seed, global sample index, position) (ALGORITHMS.md §3)."""

from __future__ import annotations

import torch
from torch import Tensor

from pretrain.objectives.randomness import STREAM_CORRUPT, philox4x32, row_keys, uniform


def corruption_words(seed: int, sample_ids: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Two uint32 words per token: one decides whether it is corrupted, one what it becomes.

    sample_ids [B] int64 -> (w0, w1) int64 [B, L]
    """
    keys = row_keys(seed, STREAM_CORRUPT, sample_ids.cpu()).unsqueeze(1)
    words = philox4x32(keys, torch.arange(length, dtype=torch.int64).unsqueeze(0))
    return words[0].to(sample_ids.device), words[1].to(sample_ids.device)


def corrupted(w0: Tensor, alpha_t: Tensor) -> Tensor:
    """[B, L] bool: the token is corrupted, with probability 1 - alpha_t (alpha_t [B])."""
    return uniform(w0) < (1 - alpha_t.float()).unsqueeze(1)
