"""Autoregressive next-token prediction (docs/algorithms.md §3.5, §4.7, §9.4): causal,
no noise, s = 0.

The model sees all L tokens; position l predicts x0[l + 1], so L - 1 tokens are scored (the
head runs on those rows only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from dlm_pretrain.pretrain.kernels.losses import CrossEntropyTerms, all_rows
from dlm_pretrain.pretrain.objectives.draws import Samples, categorical, denoiser
from dlm_pretrain.pretrain.objectives.objective import Denoiser, Objective
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor

if TYPE_CHECKING:  # pretrain.config imports this package
    from dlm_pretrain.pretrain.config import SamplingConfig


@dataclass(frozen=True, kw_only=True)
class AR(Objective):
    causal: ClassVar[bool] = True
    has_final_step: ClassVar[bool] = False
    loss_flops_per_vocab_entry: ClassVar[int] = 4

    def noise(self, x0: Tensor, t: Tensor, sample_ids: Tensor, vocab: Vocab) -> Tensor:
        """AR has no noise: xt = x0."""
        return x0

    def time_input(self, t: Tensor) -> Tensor:
        """Constant 0 (the adaLN parameters still exist, docs/pitfalls.md P21)."""
        return torch.zeros_like(t)

    def scored_share(self, seq_len: int) -> float:
        return (seq_len - 1) / seq_len

    def loss_shape(self, x0: Tensor) -> tuple[int, int]:
        return x0.shape[0], x0.shape[1] - 1

    def head_terms(self, x0: Tensor, xt: Tensor, t: Tensor, vocab: Vocab) -> CrossEntropyTerms:
        """Next-token NLL, the exact NLL (also the validation figure): every position but the
        last, which predicts nothing (the head skips it)."""
        rows = all_rows(self.loss_shape(x0), x0.device)
        targets = x0[:, 1:].reshape(-1)
        return CrossEntropyTerms(rows, targets, torch.ones(len(targets), device=x0.device))

    def sample(
        self, model: Denoiser, vocab: Vocab, cfg: SamplingConfig, seq_len: int, start_id: int
    ) -> Samples:
        """Left to right from `start_id` (pretrain.sampling.start_id: BOS as the paper's code,
        or EOS, the token before a document), one token per forward, keys and values cached
        per block (docs/algorithms.md §9.4); top_p filters x̂."""
        self.refuse_final_step(cfg)
        generator, decode = torch.Generator().manual_seed(cfg.seed), model.decoder()
        tokens = torch.full((cfg.num_samples, 1), start_id, dtype=torch.int64, device=model.device)
        s = torch.zeros(cfg.num_samples, device=model.device)
        for _ in range(seq_len - 1):
            p = denoiser(decode(tokens[:, -1:], s)[:, -1], vocab, cfg.top_p)
            tokens = torch.cat([tokens, categorical(p, generator).unsqueeze(1)], dim=1)
        return Samples(tokens, seq_len - 1)
