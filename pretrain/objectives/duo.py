"""Uniform-state diffusion, Duo (ALGORITHMS.md §3.2, §4.3): bidirectional, s = sigma_t.

The continuous-time ELBO of the uniform-state process over the K real ids. The compact form
of §4.3 subtracts large terms that cancel: of order (K/t) log(K/t) at small t (pitfall P13),
and of order r at large t. Substituting x̄_θ,j = (1 - alpha)(1 + r x̂_j), r = K alpha / (1 - alpha),
and grouping the terms that cancel into functions that are small where their arguments are,

    g(y) = log1p(y) - y,   h(y) = y / (1 + y) - log1p(y),   m(r) = (1 + r) log1p(r) - r,
    D = sum_j g(r x̂_j)  (the only vocabulary-wide sum),   λ_v = log1p(r x̂_v),

    x != z:  B = K h(r x̂_z) / (1 - alpha) - m(r) + r λ_x + D
    x == z:  B = K (1/(1 + r) - 1/(1 + r x̂_x)) / (1 - alpha)
                 + ((K - 1) log1p(r) - K λ_x + r + D) / (1 + r)
    loss = alpha' / (K alpha) * B

The per-token algebra and D run in float64 (in plain PyTorch D needs a [B, L, V] float64
temporary; the fused path sums it block by block).
"""

from __future__ import annotations

import torch
from dlm_pretrain.pretrain.kernels import losses as fused_losses
from dlm_pretrain.pretrain.objectives.corruption import corrupt
from dlm_pretrain.pretrain.objectives.reductions import (
    all_reduce_sum,
    into_shards,
    log_normaliser,
    logit_at,
    real_logits,
)
from dlm_pretrain.pretrain.objectives.schedule import alpha, alpha_prime, sigma
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor
from torch.distributed import ProcessGroup

CAUSAL = False


def noise(x0: Tensor, t: Tensor, sample_ids: Tensor, seed: int, vocab: Vocab) -> Tensor:
    """With probability 1 - alpha_t replace a token by a uniform real id (possibly itself).

    x0 [B, L] int64, t [B] -> xt [B, L] int64
    """
    return corrupt(x0, t, sample_ids, seed, vocab, uniform_ids=True)


def time_input(t: Tensor) -> Tensor:
    """Duo is conditioned on sigma_t = -log alpha_t."""
    return sigma(t)


def per_token_loss(
    logits: Tensor,
    x0: Tensor,
    xt: Tensor,
    t: Tensor,
    vocab: Vocab,
    group: ProcessGroup | None = None,
    fused: bool = False,
) -> Tensor:
    """Uniform-state ELBO per token. x0 must hold real ids. `fused`: the vocabulary sums by
    the memory-lean kernels (pretrain.kernels) instead of plain PyTorch.

    logits [B, L, V/tp] bf16|f32; x0, xt [B, L] int64; t [B] f32 -> [B, L] f32
    """
    k = vocab.num_real
    a = alpha(t.double()).unsqueeze(1)  # [B, 1] f64
    r = k * a / (1 - a)
    if fused:
        d, p_x, p_z = fused_losses.duo_statistics(
            logits, vocab.real, x0, xt, r.expand(x0.shape), group
        )
    else:
        d, p_x, p_z = _statistics(logits, x0, xt, r, vocab, group)
    y_x, y_z = r * p_x, r * p_z
    log1p_r = torch.log1p(r)
    h_z = y_z / (1 + y_z) - torch.log1p(y_z)
    m = (1 + r) * log1p_r - r
    differ = k * h_z / (1 - a) - m + r * torch.log1p(y_x) + d
    same = k * (1 / (1 + r) - 1 / (1 + y_x)) / (1 - a) + (
        (k - 1) * log1p_r - k * torch.log1p(y_x) + r + d
    ) / (1 + r)
    bracket = torch.where(x0 == xt, same, differ)
    return (alpha_prime(t.double()).unsqueeze(1) / (k * a) * bracket).float()


def _statistics(logits, x0, xt, r, vocab, group) -> tuple[Tensor, Tensor, Tensor]:
    """(D, x̂[x0], x̂[xt]) [B, L] f64 in plain PyTorch: a [B, L, V/tp] float64 temporary."""
    masked = real_logits(logits, vocab.real, group)
    lse = log_normaliser(masked, group)  # [B, L] f32
    log_p = masked - into_shards(lse, group).unsqueeze(-1)  # [B, L, V/tp] f32
    y = r.unsqueeze(-1) * log_p.double().exp()  # r x̂
    d = all_reduce_sum((torch.log1p(y) - y).sum(-1), group)
    p_x = (logit_at(masked, x0, group) - lse).double().exp()
    p_z = (logit_at(masked, xt, group) - lse).double().exp()
    return d, p_x, p_z


validation_loss = per_token_loss
