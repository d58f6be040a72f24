"""Interpolating diffusion between masked and uniform noise, GIDD (docs/algorithms.md §3.4,
§4.5, §9.5): bidirectional, s = t.

The mixing schedule puts mass alpha_t on the clean token, m_t on the mask and b_t on each of
the K real ids:

    c_t = B t^(γ/2) (1 - t)^(γ/2),  C_t = 1 + c_t,  B = 2^γ p_u / (1 - p_u),
    alpha_t = (1 - t) / C_t,  m_t = t / C_t,  b_t = c_t / (C_t K),

so that at t = 1/2 (γ = 1) the uniform share is p_u, and t -> 1 is all-mask. The loss is the
ELBO integrand w(t, z, x) (KL(q_t(.|x) ‖ q_t(.|x̂)) + ρ - log ρ - 1), ρ = q_t(z|x) / q_t(z|x̂).
With r = alpha_t / b_t and y_v = r x̂_v both terms reduce to Duo's statistics (duo.py's g, h,
m and D = Σ_v g(y_v), summed by the loss kernels without a [B, L, V] temporary):

    KL = b_t (m(r) - r log1p(y_x) - D)
    IS = 0 (z = mask),  (r - y_x)/(1 + y_x) - log1p(r) + log1p(y_x) (z = x),  -h(y_z) (else)

r reaches ~1e13 as p_u -> 0, so the algebra runs in float64 (docs/pitfalls.md P13).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.pretrain.kernels.losses import StatisticsTerms, all_rows
from dlm_pretrain.pretrain.objectives.corruption import corrupt
from dlm_pretrain.pretrain.objectives.draws import Samples, categorical, denoiser, final_step
from dlm_pretrain.pretrain.objectives.objective import Denoiser, Objective
from dlm_pretrain.pretrain.objectives.schedule import EPS
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor

if TYPE_CHECKING:  # pretrain.config imports this package
    from dlm_pretrain.pretrain.config import ObjectiveConfig, SamplingConfig

LOSS_WEIGHTINGS = ("dynamic", "clip", "elbo")
MAX_LOSS_WEIGHT = 2.0  # the training weights are clipped to [0, 2], as GIDD's configs do
LOG_FLOOR = -20.0  # p_u is floored at e^-20 and log B clipped at -20, as GIDD does


@dataclass(frozen=True)
class Mixing:
    """The schedule at times t, all float64 tensors of t's shape."""

    t: Tensor
    c: Tensor  # c_t
    c_prime: Tensor  # d c_t / dt
    alpha: Tensor  # mass on the clean token
    mask: Tensor  # mass on the mask id
    uniform: Tensor  # mass on each real id (b_t)


@dataclass(frozen=True, kw_only=True)
class GIDD(Objective):
    p_uniform: float = 0.1  # uniform share at t = 1/2 (0 leaves a masked process)
    gamma: float = 1.0  # exponent of the mixing schedule, in (0, 2]
    loss_weighting: str = "dynamic"  # the training weights, one of LOSS_WEIGHTINGS

    causal: ClassVar[bool] = False
    elbo_options: ClassVar[dict[str, str]] = {"loss_weighting": "elbo"}  # validation (P18)
    # the ELBO weights grow like 1/(1 - t): t stays in [eps, 1 - eps], as GIDD's own range
    t_max: ClassVar[float] = 1 - EPS
    loss_flops_per_vocab_entry: ClassVar[int] = 8  # Duo's statistics

    def __post_init__(self) -> None:
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(
                f"objective.loss_weighting={self.loss_weighting!r}; choose one of {LOSS_WEIGHTINGS}"
            )
        if not 0 <= self.p_uniform < 1:
            raise ConfigError(f"objective.p_uniform={self.p_uniform}; choose it in [0, 1)")
        if not 0 < self.gamma <= 2:
            raise ConfigError(
                f"objective.gamma={self.gamma}; choose it in (0, 2] (above 2 the ELBO weights "
                "and the sampler's transition turn negative)"
            )

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig) -> GIDD:
        return cls(
            seed=cfg.seed,
            p_uniform=cfg.p_uniform,
            gamma=cfg.gamma,
            loss_weighting=cfg.loss_weighting,
        )

    @property
    def log_b(self) -> float:
        """log B = log(2^γ p_u / (1 - p_u)), p_u floored and the result clipped at -20."""
        p = max(self.p_uniform, math.exp(LOG_FLOOR))
        return max(self.gamma * math.log(2) + math.log(p) - math.log1p(-p), LOG_FLOOR)

    def mixing(self, t: Tensor, num_real: int) -> Mixing:
        """The schedule at t (any shape), in float64."""
        t = t.double()
        c = math.exp(self.log_b) * (t * (1 - t)) ** (self.gamma / 2)
        c_prime = (self.gamma / 2) * (1 - 2 * t) / (t * (1 - t)) * c
        big_c = 1 + c
        return Mixing(t, c, c_prime, (1 - t) / big_c, t / big_c, c / (big_c * num_real))

    def noise(self, x0: Tensor, t: Tensor, sample_ids: Tensor, vocab: Vocab) -> Tensor:
        """The mask with probability m_t, else a uniform real id (possibly x) with K b_t."""
        mix = self.mixing(t, vocab.num_real)
        return corrupt(x0, sample_ids, self.seed, vocab, corrupt_p=1 - mix.alpha, mask_p=mix.mask)

    def time_input(self, t: Tensor) -> Tensor:
        """GIDD is conditioned on t itself."""
        return t

    def head_terms(self, x0: Tensor, xt: Tensor, t: Tensor, vocab: Vocab) -> StatisticsTerms:
        """The weighted KL + IS per token at every position, over the real ids."""
        mix = self.mixing(t.unsqueeze(1), vocab.num_real)  # [B, 1]
        r = (mix.alpha / mix.uniform).expand(x0.shape)
        masked, clean = xt == vocab.mask_id, xt == x0
        # the mask's own logit is never read: a masked token's IS term is 0 whatever x̂_z is
        z = torch.where(masked, x0, xt)
        params = {
            "uniform": mix.uniform.expand(x0.shape),
            "masked": masked,
            "clean": clean,
            "weight": self._weights(mix, masked, clean, vocab.num_real),
        }
        flat = {name: v.flatten() for name, v in params.items()}
        rows = all_rows(tuple(x0.shape), x0.device)
        return StatisticsTerms(rows, x0.flatten(), z.flatten(), r.flatten(), flat, self.divergence)

    @staticmethod
    def divergence(d, p_x, p_z, r, uniform, masked, clean, weight) -> Tensor:
        """weight (KL + IS) of the module's algebra, per row, float64."""
        y_x, y_z = r * p_x, r * p_z
        log1p_r, log1p_y_x = torch.log1p(r), torch.log1p(y_x)
        kl = uniform * ((1 + r) * log1p_r - r - r * log1p_y_x - d)
        is_clean = (r - y_x) / (1 + y_x) - log1p_r + log1p_y_x
        is_uniform = torch.log1p(y_z) - y_z / (1 + y_z)
        return weight * (kl + torch.where(masked, 0.0, torch.where(clean, is_clean, is_uniform)))

    def _weights(self, mix: Mixing, masked: Tensor, clean: Tensor, num_real: int) -> Tensor:
        """The training weights of loss_weighting, f64 [B, L]. "Clean" is z = x, uniform noise
        that drew x included, as the ELBO has it."""
        t, c, k = mix.t, mix.c, num_real
        if self.loss_weighting == "dynamic":
            # GIDD's heuristic: sigmoid(-t) stands in for the log-SNR, K + 1 ids for its V
            x_scale = math.exp(self.log_b) / (k + 1) * torch.exp(self.gamma / 2 * torch.sigmoid(-t))
            on_noise = torch.where(masked, 2.0, 1.0)
            return torch.where(clean, x_scale, on_noise).clamp(0, MAX_LOSS_WEIGHT)
        rate = c + (1 - t) * mix.c_prime
        on_clean = rate / (k * (1 - t) * (1 - t + c / k))
        on_uniform = rate / ((1 - t) * c)
        on_mask = 1 / (t * (1 - t))
        elbo = torch.where(masked, on_mask, torch.where(clean, on_clean, on_uniform))
        return elbo if self.loss_weighting == "elbo" else elbo.clamp(0, MAX_LOSS_WEIGHT)

    def sample(
        self, model: Denoiser, vocab: Vocab, cfg: SamplingConfig, seq_len: int, start_id: int
    ) -> Samples:
        """Ancestral steps of q(z_s | z_t, x̂) from all-mask at t = 1 - eps (the top of the
        trained range) down to s = 0, where the step is the exact posterior of x: no mask is
        left (docs/algorithms.md §9.5). There a masked token's posterior is x̂ itself: the last
        step draws from it (ancestral, the default) or takes its argmax (greedy); the other
        tokens draw from their posterior either way. top_p filters x̂ (GIDD's code has none)."""
        generator, device = torch.Generator().manual_seed(cfg.seed), model.device
        greedy = final_step(cfg.final_step, default="ancestral") == "greedy"
        x = torch.full((cfg.num_samples, seq_len), vocab.mask_id, dtype=torch.int64, device=device)
        grid = torch.linspace(self.t_max, 0.0, cfg.steps + 1, dtype=torch.float64)
        for i in range(cfg.steps):
            t = torch.full((cfg.num_samples,), grid[i].item(), device=device)
            x_hat = denoiser(model.logits(x, self.time_input(t)), vocab, cfg.top_p)
            z_s = categorical(self._reverse_step(x, x_hat, grid[i], grid[i + 1], vocab), generator)
            if greedy and i == cfg.steps - 1:
                z_s = torch.where(x == vocab.mask_id, x_hat.argmax(-1), z_s)
            x = z_s
        return Samples(x, cfg.steps)

    def _reverse_step(self, z: Tensor, x_hat: Tensor, t: Tensor, s: Tensor, vocab: Vocab) -> Tensor:
        """Unnormalised q(z_s = v | z_t = z, x̂) ∝ q(z | v) q_s(v | x̂), where q(z | v) =
        alpha_t/alpha_s [v = z] + κ(z), κ the mass the step from s to t adds at z (>= 0 for
        γ <= 2). z [N, L], x̂ [N, L, V] f64 -> [N, L, V] f64"""
        at_t, at_s = self.mixing(t, vocab.num_real), self.mixing(s, vocab.num_real)
        added_mask = (t - s) / ((1 - s) * (1 + at_t.c))
        added_real = (at_t.c - (1 - t) * at_s.c / (1 - s)) / ((1 + at_t.c) * vocab.num_real)
        added = torch.where(z == vocab.mask_id, added_mask, added_real).unsqueeze(-1).to(x_hat)
        keep = (at_t.alpha / at_s.alpha).item() * F.one_hot(z, vocab.size).to(x_hat)
        at_mask = F.one_hot(torch.tensor(vocab.mask_id), vocab.size).to(x_hat)
        q_s = at_s.alpha.item() * x_hat + at_s.uniform.item() * vocab.real.to(x_hat)
        q_s = q_s + at_s.mask.item() * at_mask
        return (keep + added) * q_s
