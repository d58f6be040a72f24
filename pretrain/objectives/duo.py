"""Uniform-state diffusion, Duo (docs/algorithms.md §3.2, §4.3, §9.2):
bidirectional, s = sigma_t.

The continuous-time ELBO of the uniform-state process over the K real ids. The compact form
of docs/algorithms.md §4.3 subtracts large terms that cancel: of order (K/t) log(K/t) at small t
(docs/pitfalls.md P13), and of order r at large t. Substituting
x̄_θ,j = (1 - alpha)(1 + r x̂_j), r = K alpha / (1 - alpha), and grouping the terms that cancel
into functions that are small where their arguments are,

    g(y) = log1p(y) - y,   h(y) = y / (1 + y) - log1p(y),   m(r) = (1 + r) log1p(r) - r,
    D = sum_j g(r x̂_j)  (the only vocabulary-wide sum),   λ_v = log1p(r x̂_v),

    x != z:  B = K h(r x̂_z) / (1 - alpha) - m(r) + r λ_x + D
    x == z:  B = K (1/(1 + r) - 1/(1 + r x̂_x)) / (1 - alpha)
                 + ((K - 1) log1p(r) - K λ_x + r + D) / (1 + r)
    loss = alpha' / (K alpha) * B

The per-token algebra runs in float64; D is summed block by block in float64 by the loss
kernels (pretrain.kernels.losses.StatisticsTerms), with no [B, L, V] temporary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import torch
from dlm_pretrain.pretrain.kernels.losses import StatisticsTerms, all_rows
from dlm_pretrain.pretrain.objectives.corruption import corrupt
from dlm_pretrain.pretrain.objectives.draws import (
    T_MIN,
    Samples,
    categorical,
    denoiser,
    final_step,
    nucleus,
)
from dlm_pretrain.pretrain.objectives.objective import Denoiser, Objective
from dlm_pretrain.pretrain.objectives.schedule import alpha, alpha_prime, sigma
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor

if TYPE_CHECKING:  # pretrain.config imports this package
    from dlm_pretrain.pretrain.config import SamplingConfig


@dataclass(frozen=True, kw_only=True)
class Duo(Objective):
    causal: ClassVar[bool] = False
    # the softmax's 4, then r·x̂, log1p, subtract and the sum of D
    loss_flops_per_vocab_entry: ClassVar[int] = 8

    def noise(self, x0: Tensor, t: Tensor, sample_ids: Tensor, vocab: Vocab) -> Tensor:
        """With probability 1 - alpha_t replace a token by a uniform real id (possibly itself)."""
        p = 1 - alpha(t)
        return corrupt(x0, sample_ids, self.seed, vocab, corrupt_p=p, mask_p=torch.zeros_like(p))

    def time_input(self, t: Tensor) -> Tensor:
        """Duo is conditioned on sigma_t = -log alpha_t."""
        return sigma(t)

    def head_terms(self, x0: Tensor, xt: Tensor, t: Tensor, vocab: Vocab) -> StatisticsTerms:
        """Uniform-state ELBO per token at every position (also the validation figure); x0
        must hold real ids."""
        k = vocab.num_real
        a = alpha(t.double()).unsqueeze(1).expand(x0.shape)  # [B, L] f64
        scale = alpha_prime(t.double()).unsqueeze(1) / (k * a)
        r = k * a / (1 - a)
        params = {"a": a, "same": x0 == xt, "scale": scale}
        flat = {name: v.flatten() for name, v in params.items()}
        rows = all_rows(tuple(x0.shape), x0.device)
        bracket = partial(self.bracket, k=k)
        return StatisticsTerms(rows, x0.flatten(), xt.flatten(), r.flatten(), flat, bracket)

    @staticmethod
    def bracket(d, p_x, p_z, r, a, same, scale, k) -> Tensor:
        """alpha' / (K alpha) B of the module's algebra, per row, float64."""
        y_x, y_z = r * p_x, r * p_z
        log1p_r = torch.log1p(r)
        h_z = y_z / (1 + y_z) - torch.log1p(y_z)
        m = (1 + r) * log1p_r - r
        differ = k * h_z / (1 - a) - m + r * torch.log1p(y_x) + d
        same_value = k * (1 / (1 + r) - 1 / (1 + y_x)) / (1 - a) + (
            (k - 1) * log1p_r - k * torch.log1p(y_x) + r + d
        ) / (1 + r)
        return scale * torch.where(same, same_value, differ)

    def sample(
        self, model: Denoiser, vocab: Vocab, cfg: SamplingConfig, seq_len: int, start_id: int
    ) -> Samples:
        """Ancestral steps of the uniform-state posterior with x̂ for x (docs/algorithms.md §9.2),
        from the uniform prior over real ids down to t = T_MIN, then a last step there: argmax
        x̂ at every position (greedy, the default) or the posterior with alpha_s = 1. top_p
        filters the posterior (top_p_on="reference", the paper's code) or x̂ ("denoiser")."""
        generator, device = torch.Generator().manual_seed(cfg.seed), model.device
        greedy = final_step(cfg.final_step, default="greedy") == "greedy"
        on_posterior = cfg.top_p_on == "reference"
        prior = torch.randint(vocab.num_real, (cfg.num_samples, seq_len), generator=generator)
        x = vocab.real_ids[prior.to(device)]
        grid = torch.linspace(1.0, T_MIN, cfg.steps + 1, dtype=torch.float64).tolist()
        for i, t in enumerate(grid):
            sigma_t = sigma(torch.full((cfg.num_samples,), t, device=device))
            x_hat = denoiser(model.logits(x, sigma_t), vocab, 1.0 if on_posterior else cfg.top_p)
            if i == cfg.steps and greedy:
                return Samples(x_hat.argmax(-1), cfg.steps + 1)
            a_s = alpha(grid[i + 1]) if i < cfg.steps else 1.0  # the last step ends at x
            q = self.posterior(x, x_hat, alpha(t), a_s, vocab)
            x = categorical(nucleus(q, cfg.top_p) if on_posterior else q, generator)
        return Samples(x, cfg.steps + 1)

    @staticmethod
    def posterior(z: Tensor, x_hat: Tensor, a_t: float, a_s: float, vocab: Vocab) -> Tensor:
        """q(z_s | z_t = z, x̂), normalised, alpha_ts = alpha_t / alpha_s:
        (K a_t x̂ e_z + (a_ts - a_t) e_z + (a_s - a_t) x̂ + (1 - a_ts)(1 - a_s)/K 1_real)
        / (K a_t x̂_z + 1 - a_t); zero off the real ids (z real). At alpha_s = 1 it is x̂
        reweighted towards z. z [N, L] int64, x̂ [N, L, V] f64 -> [N, L, V] f64"""
        k, a_ts = vocab.num_real, a_t / a_s
        e_z = torch.nn.functional.one_hot(z, vocab.size).double()
        x_hat_z = x_hat.gather(-1, z.unsqueeze(-1))
        q = (
            k * a_t * x_hat * e_z
            + (a_ts - a_t) * e_z
            + (a_s - a_t) * x_hat
            + (1 - a_ts) * (1 - a_s) / k * vocab.real.double()
        )
        return q / (k * a_t * x_hat_z + 1 - a_t)
