"""Eso-LM's sorted attention in the DDiT (docs/algorithms.md §5.6, §9.3): permuted tokens
with rotary at their own positions, the sequential rows' pair columns, KV-cached windows that
commit only their clean tokens, and the positions crossing pipeline stages.

Models are float32 with fresh random parameters keyed by name (so every layout and attention
spec holds the same model); 1e-5 bounds float32 sums taken in another order (permuted slots,
masks instead of is_causal, cached keys), on logits of size ~1.
"""

from __future__ import annotations

import zlib
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from dlm_pretrain.parallel.attention import pair_mask
from dlm_pretrain.parallel.config import AttentionSpec, ModelConfig, ParallelConfig
from dlm_pretrain.parallel.groups import Runtime, init_process_groups
from dlm_pretrain.parallel.model import build_pipeline
from dlm_pretrain.parallel.stages import forward_through_stages
from dlm_pretrain.pretrain.sampling import _Layers

V, L = 97, 16
CFG = ModelConfig.preset("tiny", vocab_size=V, seq_len=L, init_seed=2)
CAUSAL = AttentionSpec("causal")
DIFFUSION = AttentionSpec("sorted", diffusion_rows=True)
BOTH = AttentionSpec("sorted", diffusion_rows=True, sequential_rows=True)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def groups():
    return init_process_groups(ParallelConfig(), Runtime.detect())


def _model(groups, attention: AttentionSpec):
    """The pipeline with parameters moved off their initial values (the zero-initialised
    head and gates would hide everything) by noise keyed by the parameter's name."""
    model = build_pipeline(CFG, groups, attention)
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.add_(torch.randn(p.shape, generator=g) * 0.1)  # stays unsaturated
    return model


def _permutations(g: torch.Generator, rows: int) -> torch.Tensor:
    return torch.stack([torch.randperm(L, generator=g) for _ in range(rows)])


def _inputs(attention: AttentionSpec, seed: int, b_d: int = 2, b_s: int = 3) -> tuple:
    """(tokens [b_d + 2 b_s, L], s, *positions): columns [diffusion | z-halves | x-halves],
    a z-half and its x-half at the same positions and s."""
    g = torch.Generator().manual_seed(seed)
    b_d, b_s = b_d * attention.diffusion_rows, b_s * attention.sequential_rows
    s = torch.rand(b_d + b_s, generator=g)
    s = torch.cat([s, s[b_d:]])
    tokens = torch.randint(V, (b_d + 2 * b_s, L), generator=g)
    positions = [_permutations(g, rows) for rows in (b_d, b_s) if rows]
    return tokens, s, *positions


def _natural_rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary at positions 0..L-1 (§5.3), in float64, written here."""
    dh = x.shape[-1]
    inv_freq = CFG.rotary_base ** -(torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    angles = torch.outer(torch.arange(x.shape[2], dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    rotated = torch.cat([-x[..., dh // 2 :], x[..., : dh // 2]], dim=-1)
    return (x.double() * angles.cos() + rotated.double() * angles.sin()).to(x.dtype)


def _masked(q, k, v, mask):
    return F.scaled_dot_product_attention(
        _natural_rotary(q), _natural_rotary(k), v, attn_mask=mask[:, None]
    )


def _natural_forward(model, tokens, s, mask):
    """Logits of the tokens in their natural order with attention mask [B, L, L] (query,
    key): the blocks' own weights and residual branches around an attention written here."""
    first, *blocks, last = model.forward_funcs
    hidden, cond = first((tokens, s))
    for block in blocks:
        hidden = block._block(hidden, cond, partial(_masked, mask=mask))
    return last.head_input(hidden, cond).logits()


def test_sorted_forward_equals_the_natural_order_under_the_rank_mask(groups):
    """Slot q sees slot k <= q: in natural order, position p sees p' iff rank(p') <= rank(p),
    with rotary at the natural positions; the sorted logits, unpermuted, are the same."""
    model = _model(groups, DIFFUSION)
    g = torch.Generator().manual_seed(0)
    x, s = torch.randint(V, (3, L), generator=g), torch.rand(3, generator=g)
    sigma = _permutations(g, 3)  # slot j holds position sigma[j]
    logits = model((x.gather(1, sigma), s, sigma)).logits()
    unsorted = torch.empty_like(logits).scatter_(1, sigma[..., None].expand_as(logits), logits)
    rank = sigma.argsort(dim=1)  # rank[p]: the slot of position p
    mask = rank[:, None, :] <= rank[:, :, None]
    reference = _natural_forward(model, x, s, mask)
    assert (unsorted - reference).abs().max() < TOLERANCE
    in_order = torch.ones(L, L, dtype=torch.bool).tril().expand(3, L, L)
    assert (_natural_forward(model, x, s, in_order) - reference).abs().max() > 1e-2, (
        "the permutation made no difference"
    )


def test_identity_permutation_is_the_causal_model_bit_for_bit(groups):
    causal, sorted_ = _model(groups, CAUSAL), _model(groups, DIFFUSION)
    g = torch.Generator().manual_seed(1)
    x, s = torch.randint(V, (3, L), generator=g), torch.rand(3, generator=g)
    identity = torch.arange(L).repeat(3, 1)
    assert torch.equal(causal((x, s)).logits(), sorted_((x, s, identity)).logits())


def _bd3lm_mask(n: int) -> torch.Tensor:
    """BD3-LM's block-diffusion mask over [x_t ; x_0] (2n tokens) at block size 1: the same
    block in the same half, x_t queries on earlier x_0 blocks, x_0 causal over x_0."""
    q, k = torch.arange(2 * n)[:, None], torch.arange(2 * n)[None, :]
    q_clean, k_clean = q >= n, k >= n
    q_block, k_block = torch.where(q_clean, q - n, q), torch.where(k_clean, k - n, k)
    diagonal = (q_block == k_block) & (q_clean == k_clean)
    offset_causal = (q_block > k_block) & k_clean & ~q_clean
    causal = (q_block >= k_block) & k_clean & q_clean
    return diagonal | offset_causal | causal


def test_pair_mask_is_the_block_diffusion_mask_of_block_size_one():
    full = _bd3lm_mask(L)  # rows and columns [z ; x]
    z_queries = torch.cat([full[:L, L:], full[:L, :L]], dim=1)  # keys cat(x, z)
    assert torch.equal(pair_mask(L, torch.device("cpu")), z_queries)
    assert not full[L:, :L].any(), "an x-query saw a z-key"
    assert torch.equal(full[L:, L:], torch.ones(L, L, dtype=torch.bool).tril()), "x not causal"


def _changed_slots(model, inputs, column: int, slot: int) -> torch.Tensor:
    """Per output column and slot, the largest logit change [b_d + b_s, L] when the token of
    `column` at `slot` changes."""
    tokens, *rest = inputs
    changed = tokens.clone()
    changed[column, slot] = (changed[column, slot] + 1) % V
    return (model((changed, *rest)).logits() - model(inputs).logits()).abs().amax(dim=-1)


@pytest.mark.parametrize("slot", [0, 5, L - 1])
def test_pair_columns_see_their_own_z_token_and_the_x_tokens_before_it(groups, slot):
    """z-half logits at slot i depend on x at slots j < i and on z at slot i alone; other rows
    are untouched. b_d = 2 diffusion rows, b_s = 3 pairs: z-halves are columns 2..4, x-halves
    5..7, and output rows 0..1 diffusion, 2..4 z-halves."""
    model = _model(groups, BOTH)
    inputs = _inputs(BOTH, seed=2)
    x_change = _changed_slots(model, inputs, column=6, slot=slot)  # the x-half of pair 1
    others = [0, 1, 2, 4]  # diffusion rows and the other pairs
    assert torch.all(x_change[others] == 0)
    assert torch.all(x_change[3, : slot + 1] == 0), "a z-token saw x at its own slot or later"
    assert torch.all(x_change[3, slot + 1 :] > 0), "a z-token ignored an earlier x-token"
    z_change = _changed_slots(model, inputs, column=3, slot=slot)  # the z-half of pair 1
    assert torch.all(z_change[others] == 0)
    assert z_change[3, slot] > 0
    assert torch.all(z_change[3, torch.arange(L) != slot] == 0), "a z-token saw another z"


def test_cached_windows_that_keep_their_clean_tokens_equal_the_full_causal_forward(groups):
    """Eso-LM's decoding (docs/algorithms.md §9.3) through the sampler's Denoiser: each step's
    window is [the previous step's slots, now clean ; this step's slots, still drafts], and
    only the clean ones stay cached. The drafts differ from the final tokens, so a cache that
    kept them would differ from the full forward over [final | drafts] at every later step."""
    model = _model(groups, DIFFUSION)
    g = torch.Generator().manual_seed(3)
    final, s = torch.randint(V, (3, L), generator=g), torch.rand(3, generator=g)
    drafts = (final + torch.randint(1, V, (3, L), generator=g)) % V
    sigma = _permutations(g, 3)
    denoiser = _Layers(model.forward_funcs)
    decode, start, previous = denoiser.decoder(), 0, 0
    for count in (3, 1, 5, 4, 3):  # slots decoded per step, L in all
        window = slice(start - previous, start + count)
        tokens = torch.cat([final[:, window.start : start], drafts[:, start : window.stop]], 1)
        cached = decode(tokens, s, sigma[:, window], keep=previous)[:, previous:]
        state = torch.cat([final[:, :start], drafts[:, start:]], dim=1)
        full = model((state, s, sigma)).logits()[:, start : start + count]
        assert (cached - full).abs().max() < TOLERANCE, start
        start, previous = start + count, count
    full = model((final, s, sigma)).logits()
    assert (denoiser.logits(final, s, sigma) - full).abs().max() < TOLERANCE


def _through_stages(rank: int, world_size: int, out: Path) -> None:
    """Both stage tuples, (tokens, s, pos_d) and (tokens, s, pos_d, pos_s), through the
    stages of this layout: the last stage saves its logits as out/{name}.pt."""
    groups = init_process_groups(ParallelConfig(pipeline=world_size), Runtime.detect())
    for name, attention in (("diffusion", DIFFUSION), ("both", BOTH)):
        model = _model(groups, attention)
        head = forward_through_stages(model, _inputs(attention, seed=4), CFG, groups)
        if head is not None:
            torch.save(head.logits(), out / f"{name}.pt")


@pytest.mark.slow  # two processes
def test_positions_cross_two_pipeline_stages(groups, tmp_path):
    run_distributed(_through_stages, 2, tmp_path)
    for name, attention in (("diffusion", DIFFUSION), ("both", BOTH)):
        model = _model(groups, attention)
        one = forward_through_stages(model, _inputs(attention, seed=4), CFG, groups).logits()
        two = torch.load(tmp_path / f"{name}.pt")
        assert one.shape == (2 + 3 * attention.sequential_rows, L, V)
        assert (one - two).abs().max() < TOLERANCE, name
