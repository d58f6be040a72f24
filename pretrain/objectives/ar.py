"""Autoregressive next-token prediction (docs/algorithms.md §3.5, §4.7, §9.4): causal,
no noise, s = 0.

The model sees all L tokens; position l predicts x0[l + 1], so L - 1 tokens are scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from dlm_pretrain.pretrain.kernels.losses import all_rows, cross_entropy
from dlm_pretrain.pretrain.objectives.draws import Samples, categorical, denoiser
from dlm_pretrain.pretrain.objectives.objective import Denoiser, Objective
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor
from torch.distributed import ProcessGroup

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

    def per_token_loss(
        self,
        logits: Tensor,
        x0: Tensor,
        xt: Tensor,
        t: Tensor,
        vocab: Vocab,
        tp_group: ProcessGroup | None = None,
    ) -> Tensor:
        """Next-token NLL, the exact NLL (also the validation figure). -> [B, L-1] f32"""
        rows = all_rows(logits[:, :-1])  # every position but the last, row-major
        loss = cross_entropy(logits, vocab.real, x0[:, 1:].reshape(-1), rows, tp_group)
        return loss.view(x0.shape[0], x0.shape[1] - 1)

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
