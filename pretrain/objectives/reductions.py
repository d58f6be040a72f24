"""Per-token statistics of the logits over the real vocabulary (ALGORITHMS.md §4.1).

Each loss is algebra on a few per-token scalars: the log-normaliser over real ids, the logit
at one or two ids, and for Duo one vocabulary-wide sum. Non-real ids get probability zero
("zero-masking"). Computed in float32 whatever the logits' dtype (pitfall P14).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def real_logits(logits: Tensor, real: Tensor) -> Tensor:
    """logits [..., V] bf16|f32, real [V] bool -> [..., V] f32 with -inf at non-real ids."""
    return logits.float().masked_fill(~real.to(logits.device), float("-inf"))


def cross_entropy(logits: Tensor, real: Tensor, targets: Tensor) -> Tensor:
    """-log x̂_θ[targets] over the real ids: logits [N, V], targets [N] int64 -> [N] f32.

    F.cross_entropy fuses the log-softmax and its backward (softmax - one-hot), several
    times faster on CPU than logsumexp and gather.
    """
    return F.cross_entropy(real_logits(logits, real), targets, reduction="none")
