"""Sampling from a model (docs/algorithms.md §9): the objective's sampler (Objective.sample)
run on the pipeline's whole layer list (pipeline size 1). Under tensor parallelism every rank
gathers the full logits and, with the same seed, draws the same samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from dlm_pretrain.data_pipeline.tokenizer import SpecialIds
from dlm_pretrain.parallel.attention import KVCache
from dlm_pretrain.pretrain.config import SamplingConfig
from dlm_pretrain.pretrain.objectives.draws import Samples
from dlm_pretrain.pretrain.objectives.objective import Objective
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor, nn


class _Layers:
    """The layer list as the samplers' Denoiser (pretrain.objectives.objective)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.layers = layers
        self.device = next(layers[0].parameters()).device  # samples are built there

    def logits(self, tokens: Tensor, s: Tensor, positions: Tensor | None = None) -> Tensor:
        if positions is not None:  # sorted slots: one causal call of a fresh decoder
            return self.decoder()(tokens, s, positions, keep=0)
        *body, last = self.layers
        out = (tokens, s)
        for layer in body:
            out = layer(out)
        return last.full_logits(*out)

    def decoder(self) -> Callable[..., Tensor]:
        first, *blocks, last = self.layers
        caches = [KVCache() for _ in blocks]

        def step(
            tokens: Tensor, s: Tensor, positions: Tensor | None = None, keep: int | None = None
        ) -> Tensor:
            hidden, cond = first((tokens, s))
            for block, cache in zip(blocks, caches, strict=True):
                hidden = block.step(hidden, cond, cache, positions, keep)
            return last.full_logits(hidden, cond)

        return step


@torch.no_grad()
def generate(
    objective: Objective,
    layers: Sequence[nn.Module],
    vocab: Vocab,
    cfg: SamplingConfig,
    seq_len: int,
    start_id: int,
) -> Samples:
    """Samples of `objective`'s model (dropout off, no gradients)."""
    for layer in layers:
        layer.eval()
    return objective.sample(_Layers(layers), vocab, cfg, seq_len, start_id)


def start_id(special: SpecialIds, cfg: SamplingConfig) -> int:
    """The token AR samples after (docs/algorithms.md §9.4): BOS, as the paper's code, unless
    cfg.start_token is "eos" or the tokenizer has no BOS (special.bos < 0); EOS is what
    precedes every document in our packed data, which holds no BOS."""
    if cfg.start_token == "bos" and special.bos >= 0:
        return special.bos
    return special.eos


@dataclass(frozen=True)
class Sampler:
    """An objective's sampler over a model's layers, ready to draw with any settings
    (pretrain.trained_model.sampler builds one from a run; the sampling bench from parts)."""

    objective: Objective
    layers: Sequence[nn.Module]
    vocab: Vocab
    seq_len: int
    first_token: int  # AR's start (start_id)
    device: torch.device

    def draw(self, cfg: SamplingConfig) -> Samples:
        return generate(
            self.objective, self.layers, self.vocab, cfg, self.seq_len, self.first_token
        )
