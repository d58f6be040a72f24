"""What the last pipeline stage hands a loss: the head's input and the head (kept apart from
parallel/model.py so that the losses and the objectives import it without the model's
libraries)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class HeadInput:
    """What the last stage hands the loss instead of logits: the head's input and the head.

    A loss computes logits only at the rows it reads, a block of rows at a time
    (pretrain.kernels.losses), so [tokens, V/tp] logits never exist in training.
    hidden [L, B, d] in the compute dtype, megatron's sequence-first layout (already the
    tensor group's input copy, whose gradient is all-reduced: it must stay contiguous, as
    megatron reduces a non-contiguous gradient into a temporary); weight [V/tp, d],
    bias [V/tp] float32 parameters.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor
    group: ProcessGroup | None

    @staticmethod
    def index(rows: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Index tensors into [B, L] (a loss's rows) as indices into hidden's [L, B]."""
        batch, position = rows
        return position, batch

    def logits_at(self, hidden: Tensor) -> Tensor:
        """The head on rows of `hidden` [..., d] in its dtype (the compute dtype, as the
        blocks' matmuls; docs/algorithms.md §5.5) -> [..., V/tp]."""
        dtype = hidden.dtype
        return head_logits(hidden, self.weight.to(dtype), self.bias.to(dtype))

    def logits(self) -> Tensor:
        """Every position's logits [B, L, V/tp]: for sampling and evaluation, never training."""
        return self.logits_at(self.hidden).transpose(0, 1)


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """hidden [..., d] @ weight [V, d]ᵀ + bias, all in one dtype: the matmul, then the bias,
    as megatron's linear layers compute it (an addmm rounds differently on some backends)."""
    return torch.matmul(hidden, weight.t()) + bias
