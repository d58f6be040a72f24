"""Autoregressive next-token prediction (ALGORITHMS.md §3.5, §4.7): causal, no noise, s = 0.

The model sees all L tokens; position l predicts x0[l + 1], so L - 1 tokens are scored.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from pretrain.kernels import losses as fused_losses
from pretrain.objectives.reductions import cross_entropy
from pretrain.objectives.vocab import Vocab

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
    b, length, width = logits.shape
    targets = x0[:, 1:].reshape(-1)
    if fused:  # reads the logits in place
        rows = fused_losses.all_rows(logits[:, :-1])
        return fused_losses.cross_entropy(logits, vocab.real, targets, rows, group).view(
            b, length - 1
        )
    predicted = logits[:, :-1].reshape(b * (length - 1), width)
    return cross_entropy(predicted, vocab.real, targets, group).view(b, length - 1)


validation_loss = per_token_loss  # exact NLL
