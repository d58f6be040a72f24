"""The samplers of an exported diffusion model (dlm-pretrain docs/algorithms.md §9), and the
draws every sampler makes, AR's included.

They repeat dlm-pretrain's draw for draw: float64 uniforms from a seeded host generator,
inverting the CDF, nucleus filtering in float64, so the same seed gives the same tokens as
`dlm sample` with the same options. Each sampler takes the model (DLMForMaskedLM of
modeling_dlm.py), the number and length of the samples, the number of steps, top_p, the
generator and the options below, and returns [n, seq_len] int64. Shapes: L length,
V vocabulary (mask included).

final_step, the last step at t = sampling_t_min: "greedy" (argmax x̂ where still undecided),
"ancestral" (a draw with alpha_s = 1) or "default", the objective's own (Duo greedy, MDLM
and GIDD ancestral); Eso-LM has no last step and accepts only "default" (AR's sample takes
no final_step). AR's start_token: "bos" (as the paper's code; EOS without a BOS) or "eos".
top_p_on: "reference" filters where the paper's code does (Duo: the posterior; the others:
x̂), "denoiser" filters x̂ in every family; only Duo's samples differ between the two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

FINAL_STEPS = ("default", "greedy", "ancestral")
TOP_P_PLACEMENTS = ("reference", "denoiser")


def sample_masked(
    model, n: int, seq_len: int, steps: int, top_p: float, generator, final_step, top_p_on
) -> Tensor:
    """MDLM: a masked token is revealed between t and s with probability
    (alpha_s - alpha_t) / (1 - alpha_t), as a draw from x̂; revealed tokens are kept; the last
    step reveals the rest, by a draw from x̂ or its argmax. x̂ does not depend on t: a step
    revealing nothing reuses it. top_p filters x̂ under either top_p_on."""
    greedy = _final_step(final_step, "ancestral") == "greedy"
    mask_id, device = model.config.mask_token_id, model.device
    grid = _grid(1.0, model.config.sampling_t_min, steps)
    x = torch.full((n, seq_len), mask_id, dtype=torch.int64, device=device)
    s0 = torch.zeros(n, device=device)
    p = None
    for i in range(steps + 1):
        masked = x == mask_id
        if not masked.any():
            break
        if p is None:  # x̂ of the masked positions only
            p = model._denoiser(model.backbone(x, s0)[masked], top_p)
        if i == steps:  # the last pass reveals everything left (alpha_s = 1)
            x[masked] = p.argmax(-1) if greedy else categorical(p, generator)
            return x
        a_t, a_s = _alpha(model, grid[i]), _alpha(model, grid[i + 1])
        reveal = host_uniform(x.shape, generator, device) < (a_s - a_t) / (1 - a_t)
        reveal &= masked
        if reveal.any():  # draws at the revealed positions only
            x[reveal] = categorical(p[reveal[masked]], generator)
            p = None
    return x


def sample_uniform(
    model, n: int, seq_len: int, steps: int, top_p: float, generator, final_step, top_p_on
) -> Tensor:
    """Duo: the uniform-state posterior with x̂ for x down to t = sampling_t_min, from the
    uniform prior over the K real ids, then a last step there: argmax x̂ (greedy) or the
    posterior with alpha_s = 1. top_p filters the posterior ("reference") or x̂."""
    greedy = _final_step(final_step, "greedy") == "greedy"
    on_posterior = top_p_on == "reference"
    device, real = model.device, model._real()
    grid = _grid(1.0, model.config.sampling_t_min, steps)
    real_ids, k = real.nonzero().flatten(), int(real.sum())
    prior = torch.randint(k, (n, seq_len), generator=generator)
    x = real_ids[prior.to(device)]
    for i, t in enumerate(grid):
        x_hat = _x_hat(model, x, t, 1.0 if on_posterior else top_p)
        if i == steps and greedy:
            return x_hat.argmax(-1)
        a_s = _alpha(model, grid[i + 1]) if i < steps else 1.0
        q = _uniform_posterior(x, x_hat, _alpha(model, t), a_s, real)
        x = categorical(nucleus(q, top_p) if on_posterior else q, generator)
    return x


def _uniform_posterior(z: Tensor, x_hat: Tensor, a_t: float, a_s: float, real: Tensor) -> Tensor:
    """q(z_s | z_t = z, x̂) ∝ K a_t x̂ e_z + (a_ts - a_t) e_z + (a_s - a_t) x̂
    + (1 - a_ts)(1 - a_s)/K 1_real, a_ts = a_t / a_s, normalised. -> [n, L, V] f64"""
    k, a_ts = int(real.sum()), a_t / a_s
    e_z = F.one_hot(z, real.shape[0]).double()
    x_hat_z = x_hat.gather(-1, z.unsqueeze(-1))
    q = (
        k * a_t * x_hat * e_z
        + (a_ts - a_t) * e_z
        + (a_s - a_t) * x_hat
        + (1 - a_ts) * (1 - a_s) / k * real.double()
    )
    return q / (k * a_t * x_hat_z + 1 - a_t)


def sample_interpolating(
    model, n: int, seq_len: int, steps: int, top_p: float, generator, final_step, top_p_on
) -> Tensor:
    """GIDD: q(z_s = v | z_t = z, x̂) ∝ (alpha_t/alpha_s [v = z] + κ(z)) q_s(v | x̂), κ the mass
    the step from s to t adds at z, from all-mask at t = 1 - eps to s = 0, where no mask is
    left: there a masked token's posterior is x̂, drawn from (ancestral) or its argmax taken
    (greedy). top_p filters x̂ under either top_p_on."""
    greedy = _final_step(final_step, "ancestral") == "greedy"
    c, device = model.config, model.device
    real, k = model._real().double(), int(model._real().sum())
    grid = _grid(1 - c.schedule_eps, 0.0, steps)
    x = torch.full((n, seq_len), c.mask_token_id, dtype=torch.int64, device=device)
    at_mask = F.one_hot(torch.tensor(c.mask_token_id), c.vocab_size).double().to(device)
    for i in range(steps):
        t, s = grid[i], grid[i + 1]
        x_hat = _x_hat(model, x, t, top_p)
        c_t, c_s = _mixing(c, t), _mixing(c, s)
        alpha_t, alpha_s = (1 - t) / (1 + c_t), (1 - s) / (1 + c_s)
        added_mask = (t - s) / ((1 - s) * (1 + c_t))
        added_real = (c_t - (1 - t) * c_s / (1 - s)) / ((1 + c_t) * k)
        added = torch.full(x.shape, added_real, dtype=torch.float64, device=device)
        added = added.masked_fill(x == c.mask_token_id, added_mask).unsqueeze(-1)
        keep = alpha_t / alpha_s * F.one_hot(x, c.vocab_size).double()
        q_s = alpha_s * x_hat + c_s / ((1 + c_s) * k) * real + s / (1 + c_s) * at_mask
        z_s = categorical((keep + added) * q_s, generator)
        if greedy and i == steps - 1:
            z_s = torch.where(x == c.mask_token_id, x_hat.argmax(-1), z_s)
        x = z_s
    return x


def sample_sorted(
    model, n: int, seq_len: int, steps: int, top_p: float, generator, final_step, top_p_on
) -> Tensor:
    """Eso-LM: a random order per sample, then slots decoded front to back: as many per step
    as the alpha_0-scaled schedule reveals (one count per step for the whole batch, so the
    caches stay aligned), then the rest one per step, left to right; each a draw from x̂
    (top_p filters x̂). A step runs the slots decoded at the step before (committing their
    keys and values) and the slots it decodes. No last step to choose."""
    _refuse_final_step(final_step)
    device, alpha_0 = model.device, model.config.alpha_0
    order = torch.stack([torch.randperm(seq_len, generator=generator) for _ in range(n)])
    counts = _decode_counts(model, seq_len, steps, generator)
    diffused = sum(counts)
    order[:, diffused:] = order[:, diffused:].sort(dim=1).values  # the sequential tail
    tail = seq_len - diffused
    if tail:
        counts += [tail] if alpha_0 == 1 else [1] * tail
    order = order.to(device)
    tokens = torch.full((n, seq_len), model.config.mask_token_id, dtype=torch.int64, device=device)
    s0, caches = torch.zeros(n, device=device), model.backbone.caches()
    start = previous = 0
    for count in counts:
        end = start + count
        window = slice(start - previous, end)
        logits = model.backbone(tokens[:, window], s0, order[:, window], caches, keep=previous)
        p = model._denoiser(logits[:, previous:], top_p)
        tokens[:, start:end] = categorical(p, generator)
        start, previous = end, count
    return torch.empty_like(tokens).scatter_(1, order, tokens)


SAMPLERS = {
    "mdlm": sample_masked,
    "duo": sample_uniform,
    "gidd": sample_interpolating,
    "esolm": sample_sorted,
}


def start_id(config, start_token: str) -> int:
    """AR's first token: BOS (as the paper's code) unless start_token is "eos" or the tokenizer
    has none; EOS precedes every document of the training data, which holds no BOS."""
    if start_token not in ("bos", "eos"):
        raise ValueError(f"start_token={start_token!r}; choose 'bos' or 'eos'")
    bos = config.bos_token_id
    if start_token == "bos" and bos is not None and bos >= 0:
        return bos
    return config.eos_token_id


def check_options(final_step: str, top_p_on: str) -> None:
    """Refuses a value the samplers do not know, before any draw."""
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step={final_step!r}; choose one of {FINAL_STEPS}")
    if top_p_on not in TOP_P_PLACEMENTS:
        raise ValueError(f"top_p_on={top_p_on!r}; choose one of {TOP_P_PLACEMENTS}")


def _final_step(choice: str, default: str) -> str:
    """final_step with "default" read as the objective's own."""
    return default if choice == "default" else choice


def _refuse_final_step(final_step: str) -> None:
    """Eso-LM decodes each token once: an explicit final_step is an error, not ignored."""
    if final_step != "default":
        raise ValueError(
            f"final_step={final_step!r} does not apply to Eso-LM, which decodes every token "
            "once from x̂; leave it at 'default'"
        )


def _grid(start: float, end: float, steps: int) -> list[float]:
    return torch.linspace(start, end, steps + 1, dtype=torch.float64).tolist()


def _alpha(model, t: float) -> float:
    """alpha_t = 1 - (1 - eps) t, the log-linear schedule."""
    return 1 - (1 - model.config.schedule_eps) * t


def _decode_counts(model, seq_len: int, steps: int, generator) -> list[int]:
    """How many slots each Eso-LM diffusion step decodes: the reveal probability
    (alpha_s - alpha_t) / (1 - alpha_t) of alpha_0 alpha_t on each remaining slot, drawn once
    for the batch; steps that decode nothing are skipped."""
    grid = _grid(1.0, model.config.sampling_t_min, steps)
    counts, remaining, alpha_0 = [], seq_len, model.config.alpha_0
    for i in range(steps):
        a_t, a_s = alpha_0 * _alpha(model, grid[i]), alpha_0 * _alpha(model, grid[i + 1])
        u = host_uniform((remaining,), generator, "cpu")
        counts.append(int((u < (a_s - a_t) / (1 - a_t)).sum()))
        remaining -= counts[-1]
    return [count for count in counts if count > 0]


def _mixing(c, t: float) -> float:
    """GIDD's c_t = B t^(γ/2) (1 - t)^(γ/2), B = 2^γ p_u / (1 - p_u) (log B clipped at -20)."""
    p = max(c.p_uniform, math.exp(-20))
    log_b = max(c.gamma * math.log(2) + math.log(p) - math.log1p(-p), -20.0)
    return math.exp(log_b) * (t * (1 - t)) ** (c.gamma / 2)


def _x_hat(model, x: Tensor, t: float, top_p: float) -> Tensor:
    """x̂ of the tokens x [n, L] at time t. -> [n, L, V] f64"""
    t = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    return model._denoiser(model.backbone(x, model._time_input(t)), top_p)


def nucleus(p: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of ids whose mass reaches top_p, renormalised. p [..., V] f64"""
    if top_p >= 1:
        return p
    sorted_p, order = p.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely ids
    sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    kept = torch.zeros_like(p).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def host_uniform(shape: torch.Size, generator: torch.Generator, device) -> Tensor:
    """float64 uniforms from the host generator: the same draws on any device."""
    return torch.rand(shape, dtype=torch.float64, generator=generator).to(device)


def categorical(p: Tensor, generator: torch.Generator) -> Tensor:
    """One draw per row of p [..., V] (unnormalised, f64) by inverting its CDF -> [...] int64"""
    cdf = p.cumsum(-1)
    u = host_uniform(p.shape[:-1], generator, p.device)
    ids = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return ids.clamp_max(p.shape[-1] - 1)
