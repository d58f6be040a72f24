"""Autoregressive next-token prediction (ALGORITHMS.md §3.5, §4.7): causal, no noise, s = 0.

The model sees all L tokens; position l predicts x0[l + 1], so L - 1 tokens are scored.
"""

from __future__ import annotations

import torch
from dlm_pretrain.pretrain.kernels.losses import all_rows
from dlm_pretrain.pretrain.objectives.reductions import cross_entropy_at
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor
from torch.distributed import ProcessGroup

CAUSAL = True


def noise(x0: Tensor, t: Tensor, sample_ids: Tensor, seed: int, vocab: Vocab) -> Tensor:
    """AR has no noise: xt = x0. x0 [B, L] int64 -> [B, L] int64"""
    return x0


def time_input(t: Tensor) -> Tensor:
    """The conditioning scalar s: constant 0 (the adaLN parameters still exist, P21)."""
    return torch.zeros_like(t)


def per_token_loss(
    logits: Tensor,
    x0: Tensor,
    xt: Tensor,
    t: Tensor,
    vocab: Vocab,
    group: ProcessGroup | None = None,
    fused: bool = False,
) -> Tensor:
    """Next-token NLL. logits [B, L, V/tp] bf16|f32; x0, xt [B, L] int64; t [B] -> [B, L-1] f32"""
    rows = all_rows(logits[:, :-1])  # every position but the last, row-major
    loss = cross_entropy_at(logits, rows, vocab.real, x0[:, 1:].reshape(-1), group, fused)
    return loss.view(x0.shape[0], x0.shape[1] - 1)


validation_loss = per_token_loss  # exact NLL
