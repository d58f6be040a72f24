"""Masked (absorbing-state) diffusion, MDLM (docs/algorithms.md §3.1, §4.2, §9.1):
bidirectional, s = 0.

loss_type "elbo": (1/t) CE on masked tokens, the continuous-time ELBO of the log-linear
schedule (alpha'_t / (1 - alpha_t) = -1/t exactly). "cross_entropy": the same without 1/t,
the paper's low-variance training objective. Validation is always the ELBO (docs/pitfalls.md
P18). Unmasked tokens score 0 (carry-over) and the mask id is never predicted (zero-masking).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.pretrain.kernels.losses import CrossEntropyTerms
from dlm_pretrain.pretrain.objectives.corruption import corrupt
from dlm_pretrain.pretrain.objectives.draws import (
    T_MIN,
    Samples,
    categorical,
    denoiser,
    final_step,
    host_uniform,
)
from dlm_pretrain.pretrain.objectives.objective import Denoiser, Objective
from dlm_pretrain.pretrain.objectives.schedule import EPS, alpha
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor

if TYPE_CHECKING:  # pretrain.config imports this package
    from dlm_pretrain.pretrain.config import ObjectiveConfig, SamplingConfig

LOSS_TYPES = ("elbo", "cross_entropy")


@dataclass(frozen=True, kw_only=True)
class MDLM(Objective):
    loss_type: str = "elbo"  # the training loss, one of LOSS_TYPES

    causal: ClassVar[bool] = False
    elbo_options: ClassVar[dict[str, str]] = {"loss_type": "elbo"}  # validation (P18)
    loss_flops_per_vocab_entry: ClassVar[int] = 4

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"objective.loss_type={self.loss_type!r}; choose one of {LOSS_TYPES}")

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig) -> MDLM:
        return cls(seed=cfg.seed, loss_type=cfg.loss_type)

    def noise(self, x0: Tensor, t: Tensor, sample_ids: Tensor, vocab: Vocab) -> Tensor:
        """Mask each token with probability 1 - alpha_t."""
        p = 1 - alpha(t)
        return corrupt(x0, sample_ids, self.seed, vocab, corrupt_p=p, mask_p=p)

    def time_input(self, t: Tensor) -> Tensor:
        """MDLM is not time-conditioned: s = 0 (docs/pitfalls.md P21)."""
        return torch.zeros_like(t)

    def scored_share(self, seq_len: int) -> float:
        """E[1 - alpha_t] = (1 - eps) E[t] over t uniform in [eps, t_max): about one half."""
        return (1 - EPS) * (EPS + self.t_max) / 2

    def head_terms(self, x0: Tensor, xt: Tensor, t: Tensor, vocab: Vocab) -> CrossEntropyTerms:
        """CE of the masked tokens, each divided by its row's `_divisor`: the head runs on the
        masked rows only (unmasked tokens score 0, carry-over)."""
        rows = (xt == vocab.mask_id).nonzero(as_tuple=True)  # host sync: the masked count
        return CrossEntropyTerms(rows, x0[rows], self._divisor(t)[rows[0]])

    def _divisor(self, t: Tensor) -> Tensor:
        """What a row's masked CE is divided by: t for the ELBO (alpha'/(1 - alpha) = -1/t),
        1 for cross_entropy. [B] -> [B] f32"""
        return t.float() if self.loss_type == "elbo" else torch.ones_like(t, dtype=torch.float32)

    def sample(
        self, model: Denoiser, vocab: Vocab, cfg: SamplingConfig, seq_len: int, start_id: int
    ) -> Samples:
        """Ancestral steps from the all-mask prior (docs/algorithms.md §9.1): a masked token is
        revealed between t and s with probability (alpha_s - alpha_t) / (1 - alpha_t), as a draw
        from x̂; revealed tokens are kept (x̂ and the draws are computed where they are used:
        masked and revealed positions). The last step (alpha_s = 1) reveals what is left by
        a draw from x̂ (ancestral, the default) or its argmax (greedy). x̂ does not depend on
        t, so a step that reveals nothing reuses it. top_p filters x̂ under either top_p_on
        (as the paper's code): on the posterior it would keep only the mask wherever the mask's
        share (1 - alpha_s) / (1 - alpha_t) reaches top_p."""
        generator, device = torch.Generator().manual_seed(cfg.seed), model.device
        greedy = final_step(cfg.final_step, default="ancestral") == "greedy"
        x = torch.full((cfg.num_samples, seq_len), vocab.mask_id, dtype=torch.int64, device=device)
        s0 = torch.zeros(cfg.num_samples, device=device)
        grid = torch.linspace(1.0, T_MIN, cfg.steps + 1, dtype=torch.float64).tolist()
        p, passes = None, 0
        for i in range(cfg.steps + 1):
            masked = x == vocab.mask_id
            if not masked.any():  # host sync: once per step
                break
            if p is None:  # x̂ of the masked positions only: [masked, V]
                p = denoiser(model.logits(x, s0)[masked], vocab, cfg.top_p)  # host sync: count
                passes += 1
            if i == cfg.steps:  # the last pass reveals everything left (alpha_s = 1)
                x[masked] = p.argmax(-1) if greedy else categorical(p, generator)
                return Samples(x, passes)
            a_t, a_s = alpha(grid[i]), alpha(grid[i + 1])
            reveal = host_uniform(x.shape, generator, device) < (a_s - a_t) / (1 - a_t)
            reveal &= masked
            if reveal.any():  # draws at the revealed positions only
                x[reveal] = categorical(p[reveal[masked]], generator)
                p = None
        return Samples(x, passes)
