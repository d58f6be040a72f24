"""Eso-LM, the interpolation between AR and masked diffusion (docs/algorithms.md §3.3, §4.4,
§5.6, §9.3), with alpha_0 = 1: the paper's setting, its diffusion branch alone.

Masked diffusion whose denoiser is causal over a per-sequence order of the tokens: every
sequence is sorted so that its clean tokens come first (in a random order), then its masked
ones; each slot keeps the rotary angle of its original position and sees the slots before
it. The noise, the loss (carry-over, 1/t or none) and the ELBO are MDLM's, on the sorted
tokens; the loss is a sum over tokens, so sorting changes no figure. Because a slot sees
only earlier slots, the sampler decodes a few slots per step and keeps the keys and values of
decoded tokens: each step runs only the newly decoded and the next slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from dlm_pretrain.parallel.config import AttentionSpec
from dlm_pretrain.pretrain.objectives.draws import T_MIN, Samples, categorical, denoiser
from dlm_pretrain.pretrain.objectives.mdlm import MDLM
from dlm_pretrain.pretrain.objectives.objective import Denoiser
from dlm_pretrain.pretrain.objectives.randomness import STREAM_ORDER, philox4x32, row_keys
from dlm_pretrain.pretrain.objectives.schedule import alpha
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor

if TYPE_CHECKING:  # pretrain.config imports this package
    from dlm_pretrain.pretrain.config import SamplingConfig


@dataclass(frozen=True, kw_only=True)
class EsoLM(MDLM):
    causal: ClassVar[bool] = True  # over the sorted slots (the FLOPs count half the scores)

    def attention_spec(self) -> AttentionSpec:
        return AttentionSpec("sorted", diffusion_rows=True)

    def batch(
        self, x0: Tensor, t: Tensor, sample_ids: Tensor, vocab: Vocab
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, Tensor, Tensor]]:
        """MDLM's noise, then every row sorted: inputs (xt, s, positions) and labels
        (x0, xt, t) in sorted order; positions [B, L] int64 holds each slot's original
        position."""
        xt = self.noise(x0, t, sample_ids, vocab)
        positions = self.order(xt, sample_ids, vocab)
        x0, xt = x0.gather(1, positions), xt.gather(1, positions)
        return (xt, self.time_input(t), positions), (x0, xt, t)

    def order(self, xt: Tensor, sample_ids: Tensor, vocab: Vocab) -> Tensor:
        """The positions in sorted order: clean before masked, each group in the order of a
        Philox word keyed by (seed, sample id, position), so any split of the batch and any
        device sort alike (integer keys, stable sort). xt [B, L] -> [B, L] int64"""
        keys = row_keys(self.seed, STREAM_ORDER, sample_ids)
        words = philox4x32(keys.unsqueeze(1), torch.arange(xt.shape[1], device=xt.device))[0]
        return ((xt == vocab.mask_id).long() * 2**32 + words).argsort(dim=1, stable=True)

    def sample(
        self, model: Denoiser, vocab: Vocab, cfg: SamplingConfig, seq_len: int, start_id: int
    ) -> Samples:
        """From all-mask: a random order per sample, then slots decoded front to back, as many
        per step as MDLM's schedule reveals (one count per step for the whole batch, so the
        caches stay aligned), each a draw from x̂ (docs/algorithms.md §9.3). With
        cfg.kv_cache a step runs the slots decoded at the step before (committing their keys
        and values) and the slots it decodes; without, the whole sequence."""
        generator, device = torch.Generator().manual_seed(cfg.seed), model.device
        n = cfg.num_samples
        order = torch.stack([torch.randperm(seq_len, generator=generator) for _ in range(n)])
        order = order.to(device)
        tokens = torch.full((n, seq_len), vocab.mask_id, dtype=torch.int64, device=device)
        s0 = torch.zeros(n, device=device)
        decode = model.decoder() if cfg.kv_cache else None
        start = previous = 0
        counts = _decode_counts(seq_len, cfg.steps, generator)
        for count in counts:
            end = start + count
            if decode is None:
                logits = model.logits(tokens, s0, order)[:, start:end]
            else:
                window = slice(start - previous, end)
                logits = decode(tokens[:, window], s0, order[:, window], keep=previous)
                logits = logits[:, previous:]
            tokens[:, start:end] = categorical(denoiser(logits, vocab, cfg.top_p), generator)
            start, previous = end, count
        return Samples(torch.empty_like(tokens).scatter_(1, order, tokens), len(counts))


def _decode_counts(seq_len: int, steps: int, generator: torch.Generator) -> list[int]:
    """How many slots each step decodes: MDLM's reveal probability
    (alpha_s - alpha_t) / (1 - alpha_t) on each remaining slot, drawn once for the batch on
    the host; the last step takes the rest; steps that decode nothing are skipped."""
    grid = torch.linspace(1.0, T_MIN, steps + 1, dtype=torch.float64).tolist()
    counts, remaining = [], seq_len
    for i in range(steps):
        a_t, a_s = alpha(grid[i]), alpha(grid[i + 1])
        u = torch.rand(remaining, dtype=torch.float64, generator=generator)
        counts.append(int((u < (a_s - a_t) / (1 - a_t)).sum()))
        remaining -= counts[-1]
    counts.append(remaining)
    return [count for count in counts if count > 0]
