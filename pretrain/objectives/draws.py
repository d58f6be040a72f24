"""What every sampler draws with (docs/algorithms.md §9).

Probabilities are float64 and each categorical draw inverts the CDF with one float64 uniform
per position, drawn at the step that uses it (docs/pitfalls.md P4, P5). Nucleus (top-p)
filtering applies where the paper's code applies it (`top_p_on="reference"`: Duo's posterior,
every other family's x̂) or to x̂ in every family (`"denoiser"`); the reference ignores it
for AR and MDLM (docs/pitfalls.md P3). Only real ids are ever sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor

T_MIN = 1e-5  # the reverse process runs from t = 1 down to here (docs/algorithms.md §9)
# sampling.final_step: how the last step decides, "default" being the family's own
FINAL_STEPS = ("default", "greedy", "ancestral")
# sampling.top_p_on: where the nucleus filters, "reference" as the paper's code does it
TOP_P_PLACEMENTS = ("reference", "denoiser")


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


def host_uniform(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    """float64 uniforms drawn on the host generator, then copied: the same draws on any
    device (one explicit copy per sampling step)."""
    return torch.rand(shape, dtype=torch.float64, generator=generator).to(device)


def categorical(p: Tensor, generator: torch.Generator) -> Tensor:
    """One draw per row of p [..., V] (unnormalised, f64) by inverting its CDF -> [...] int64"""
    cdf = p.cumsum(-1)
    u = host_uniform(p.shape[:-1], generator, p.device)
    ids = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return ids.clamp_max(p.shape[-1] - 1)


def denoiser(logits: Tensor, vocab: Vocab, top_p: float) -> Tensor:
    """x̂: softmax over the real ids in float64, nucleus-filtered. [N, L, V] -> [N, L, V] f64"""
    logits = logits.double().masked_fill(~vocab.real, float("-inf"))
    return nucleus(torch.softmax(logits, dim=-1), top_p)


def final_step(choice: str, default: str) -> str:
    """sampling.final_step with "default" read as the family's own: the paper's code ends Duo
    greedily and MDLM, GIDD ancestrally (docs/algorithms.md §9)."""
    return default if choice == "default" else choice
