"""Masked (absorbing-state) diffusion, MDLM (ALGORITHMS.md §3.1, §4.2): bidirectional, s = 0.

loss_type "elbo": (1/t) CE on masked tokens, the continuous-time ELBO of the log-linear
schedule (alpha'_t / (1 - alpha_t) = -1/t exactly). "cross_entropy": the same without 1/t,
the paper's low-variance training objective. Validation is always the ELBO. Unmasked tokens
score 0 (carry-over) and the mask id is never predicted (zero-masking).
"""

from __future__ import annotations

import torch
from dlm_pretrain.pretrain.objectives.corruption import corrupt
from dlm_pretrain.pretrain.objectives.reductions import cross_entropy_at
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor
from torch.distributed import ProcessGroup

CAUSAL = False
LOSS_TYPES = ("elbo", "cross_entropy")


def noise(x0: Tensor, t: Tensor, sample_ids: Tensor, seed: int, vocab: Vocab) -> Tensor:
    """Mask each token with probability 1 - alpha_t. x0 [B, L] int64, t [B] -> xt [B, L] int64"""
    return corrupt(x0, t, sample_ids, seed, vocab, uniform_ids=False)


def time_input(t: Tensor) -> Tensor:
    """MDLM is not time-conditioned: s = 0 (P21)."""
    return torch.zeros_like(t)


def per_token_loss(
    logits: Tensor,
    x0: Tensor,
    xt: Tensor,
    t: Tensor,
    vocab: Vocab,
    group: ProcessGroup | None = None,
    loss_type: str = "elbo",
    fused: bool = False,
) -> Tensor:
    """logits [B, L, V/tp] bf16|f32; x0, xt [B, L] int64; t [B] f32 -> [B, L] f32"""
    masked = xt == vocab.mask_id
    rows = masked.nonzero(as_tuple=True)  # only masked tokens are scored: carry-over
    ce = cross_entropy_at(logits, rows, vocab.real, x0[rows], group, fused)
    if loss_type == "elbo":
        ce = ce / t.float()[rows[0]]
    return torch.zeros(masked.shape, device=logits.device).index_put(rows, ce)


def validation_loss(
    logits: Tensor,
    x0: Tensor,
    xt: Tensor,
    t: Tensor,
    vocab: Vocab,
    group: ProcessGroup | None = None,
    fused: bool = False,
) -> Tensor:
    """The ELBO, whatever the training loss_type (pitfall P18). -> [B, L] f32"""
    return per_token_loss(logits, x0, xt, t, vocab, group, "elbo", fused)
