"""Samplers (ALGORITHMS.md §9): AR with a KV cache, MDLM ancestral with caching, Duo ancestral
with a greedy final step.

Probabilities are float64 and each categorical draw inverts the CDF with one float64 uniform
per position, drawn at the step that uses it (pitfalls P4, P5). Nucleus (top-p) filtering
applies to the denoiser's distribution x̂ in every family (the reference ignores it for AR and
MDLM, P3). Only real ids are ever sampled. The model is the pipeline's whole layer list
(pipeline size 1); under tensor parallelism every rank gathers the full logits and, with the
same seed, draws the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from dlm_pretrain.parallel.model import KVCache
from dlm_pretrain.pretrain.config import SamplingConfig
from dlm_pretrain.pretrain.objectives.schedule import alpha, sigma
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor, nn

T_MIN = 1e-5  # the reverse process runs from t = 1 down to here (§9)


@dataclass(frozen=True)
class Samples:
    tokens: Tensor  # [N, L] int64
    forward_passes: int  # NFE: full-model forward passes spent


def nucleus(p: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of ids whose mass reaches top_p, renormalised. p [..., V] f64"""
    if top_p >= 1:
        return p
    sorted_p, order = p.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely ids
    sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    kept = torch.zeros_like(p).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def _uniform(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    """float64 uniforms drawn on the host generator, then copied: the same draws on any
    device (one explicit copy per sampling step)."""
    return torch.rand(shape, dtype=torch.float64, generator=generator).to(device)


def categorical(p: Tensor, generator: torch.Generator) -> Tensor:
    """One draw per row of p [..., V] (unnormalised, f64) by inverting its CDF -> [...] int64"""
    cdf = p.cumsum(-1)
    u = _uniform(p.shape[:-1], generator, p.device)
    ids = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return ids.clamp_max(p.shape[-1] - 1)


def denoiser(logits: Tensor, vocab: Vocab, top_p: float) -> Tensor:
    """x̂: softmax over the real ids in float64, nucleus-filtered. [N, L, V] -> [N, L, V] f64"""
    logits = logits.double().masked_fill(~vocab.real, float("-inf"))
    return nucleus(torch.softmax(logits, dim=-1), top_p)


def _device(layers: Sequence[nn.Module]) -> torch.device:
    """Where the model is: samples are built there."""
    return next(layers[0].parameters()).device


def _forward(layers: Sequence[nn.Module], tokens: Tensor, s: Tensor) -> Tensor:
    """Full logits [N, L, V] (gathered over the tensor group)."""
    *body, last = layers
    out = (tokens, s)
    for layer in body:
        out = layer(out)
    return last.full_logits(out)


def sample_ar(
    layers: Sequence[nn.Module], vocab: Vocab, cfg: SamplingConfig, seq_len: int, start_id: int
) -> Samples:
    """Left to right from `start_id` (EOS: the token before a document), one token per
    forward, keys and values cached per block (§9.4)."""
    generator, device = torch.Generator().manual_seed(cfg.seed), _device(layers)
    first, *blocks, last = layers
    caches = [KVCache() for _ in blocks]
    tokens = torch.full((cfg.num_samples, 1), start_id, dtype=torch.int64, device=device)
    s = torch.zeros(cfg.num_samples, device=device)
    for _ in range(seq_len - 1):
        hidden, cond = first((tokens[:, -1:], s))
        for block, cache in zip(blocks, caches, strict=True):
            hidden = block.step(hidden, cond, cache)
        p = denoiser(last.full_logits((hidden, cond))[:, -1], vocab, cfg.top_p)
        tokens = torch.cat([tokens, categorical(p, generator).unsqueeze(1)], dim=1)
    return Samples(tokens, seq_len - 1)


def sample_mdlm(
    layers: Sequence[nn.Module], vocab: Vocab, cfg: SamplingConfig, seq_len: int, start_id: int
) -> Samples:
    """Ancestral steps from the all-mask prior (§9.1): a masked token is revealed between t and
    s with probability (alpha_s - alpha_t) / (1 - alpha_t), as a draw from x̂; revealed tokens
    are kept. x̂ does not depend on t, so a step that reveals nothing reuses it."""
    generator, device = torch.Generator().manual_seed(cfg.seed), _device(layers)
    x = torch.full((cfg.num_samples, seq_len), vocab.mask_id, dtype=torch.int64, device=device)
    s0 = torch.zeros(cfg.num_samples, device=device)
    grid = torch.linspace(1.0, T_MIN, cfg.steps + 1, dtype=torch.float64).tolist()
    p, passes = None, 0
    for i in range(cfg.steps + 1):
        masked = x == vocab.mask_id
        if not masked.any():  # host sync: once per step
            break
        if p is None:
            p, passes = denoiser(_forward(layers, x, s0), vocab, cfg.top_p), passes + 1
        if i < cfg.steps:  # the last pass reveals everything left (alpha_s = 1)
            a_t, a_s = alpha(grid[i]), alpha(grid[i + 1])
            reveal = _uniform(x.shape, generator, device) < (a_s - a_t) / (1 - a_t)
        else:
            reveal = torch.ones_like(masked)
        reveal &= masked
        if reveal.any():
            x = torch.where(reveal, categorical(p, generator), x)
            p = None
    return Samples(x, passes)


def sample_duo(
    layers: Sequence[nn.Module], vocab: Vocab, cfg: SamplingConfig, seq_len: int, start_id: int
) -> Samples:
    """Ancestral steps of the uniform-state posterior with x̂ for x (§9.2), from the uniform
    prior over real ids, then a greedy final step (argmax x̂)."""
    generator, device = torch.Generator().manual_seed(cfg.seed), _device(layers)
    real = vocab.real.double()
    k = vocab.num_real
    prior = torch.randint(k, (cfg.num_samples, seq_len), generator=generator)
    x = vocab.real_ids[prior.to(device)]
    grid = torch.linspace(1.0, T_MIN, cfg.steps + 1, dtype=torch.float64).tolist()
    for i in range(cfg.steps):
        t = torch.full((cfg.num_samples,), grid[i], device=device)
        x_hat = denoiser(_forward(layers, x, sigma(t)), vocab, cfg.top_p)
        a_t, a_s = alpha(grid[i]), alpha(grid[i + 1])
        a_ts = a_t / a_s
        e_z = torch.nn.functional.one_hot(x, vocab.size).double()
        x_hat_z = x_hat.gather(-1, x.unsqueeze(-1))
        q = (
            k * a_t * x_hat * e_z
            + (a_ts - a_t) * e_z
            + (a_s - a_t) * x_hat
            + (1 - a_ts) * (1 - a_s) / k * real
        )
        x = categorical(q / (k * a_t * x_hat_z + 1 - a_t), generator)
    t = torch.full((cfg.num_samples,), T_MIN, device=device)
    x_hat = denoiser(_forward(layers, x, sigma(t)), vocab, 1.0)
    return Samples(x_hat.argmax(-1), cfg.steps + 1)


SAMPLERS = {"ar": sample_ar, "mdlm": sample_mdlm, "duo": sample_duo}


@torch.no_grad()
def generate(
    objective: str,
    layers: Sequence[nn.Module],
    vocab: Vocab,
    cfg: SamplingConfig,
    seq_len: int,
    start_id: int,
) -> Samples:
    """Samples of `objective`'s model (dropout off, no gradients)."""
    for layer in layers:
        layer.eval()
    return SAMPLERS[objective](layers, vocab, cfg, seq_len, start_id)
