"""Noise is a function of the data, not of the layout; its rates follow alpha_t."""

from __future__ import annotations

import pytest
import torch
from dlm_pretrain.pretrain.kernels import KERNELS_ENV
from dlm_pretrain.pretrain.objectives import GIDD, MDLM, Duo, EsoLM
from dlm_pretrain.pretrain.objectives.randomness import philox4x32, philox_key, row_keys
from dlm_pretrain.pretrain.objectives.schedule import EPS, alpha, sample_t
from dlm_pretrain.pretrain.objectives.vocab import Vocab

VOCAB = Vocab.build(300, mask_id=4, never_in_data=(3, 299, 298))
G, L, SEED, STEP = 16, 64, 1234, 77
NOISED = {"mdlm": MDLM(seed=SEED), "duo": Duo(seed=SEED), "gidd": GIDD(seed=SEED, p_uniform=0.3)}


def _global_batch():
    g = torch.Generator().manual_seed(9)
    x0 = VOCAB.real_ids[torch.randint(VOCAB.num_real, (G, L), generator=g)]
    sample_ids = torch.randperm(10_000, generator=g)[:G]
    return x0, sample_ids


def _noised(name: str, dp_size: int, micro: int) -> torch.Tensor:
    """Split the global batch over dp ranks (contiguous) and micro-batches, noise each piece."""
    x0, sample_ids = _global_batch()
    pieces = []
    per_rank = G // dp_size
    for rank in range(dp_size):
        for m in range(per_rank // micro):
            rows = torch.arange(rank * per_rank + m * micro, rank * per_rank + (m + 1) * micro)
            t = sample_t(SEED, STEP, rows, G, NOISED[name].t_max)
            pieces.append(NOISED[name].noise(x0[rows], t, sample_ids[rows], VOCAB))
    return torch.cat(pieces)


@pytest.mark.parametrize("name", list(NOISED))
def test_xt_is_bit_identical_for_any_split(name):
    reference = _noised(name, 1, G)
    assert not torch.equal(reference, _global_batch()[0]), "nothing was noised"
    for dp_size, micro in [(2, 8), (4, 4), (4, 1), (1, 2)]:
        assert torch.equal(_noised(name, dp_size, micro), reference)


def test_eso_lm_order_is_bit_identical_for_any_split():
    """Eso-LM's sorted batch (tokens and positions) is a function of the sample, not of the
    split, as the noise is."""
    x0, sample_ids = _global_batch()
    esolm = EsoLM(seed=SEED)

    def sorted_inputs(rows):
        t = sample_t(SEED, STEP, rows, G)
        xt, _, positions = esolm.batch(x0[rows], t, sample_ids[rows], VOCAB)[0]
        return torch.cat([xt, positions], dim=1)

    whole = sorted_inputs(torch.arange(G))
    for micro in (1, 4, 8):
        pieces = [sorted_inputs(torch.arange(i, i + micro)) for i in range(0, G, micro)]
        assert torch.equal(torch.cat(pieces), whole)


def test_t_is_stratified_over_the_global_batch():
    t = sample_t(SEED, STEP, torch.arange(G), G)
    u = (t.double() - EPS) / (1 - EPS)
    strata = torch.floor(u * G).long()
    assert torch.equal(strata, torch.arange(G))
    assert not torch.equal(t, sample_t(SEED, STEP + 1, torch.arange(G), G))
    assert t.min() >= EPS and t.max() < 1


@pytest.mark.parametrize("t_value", [0.05, 0.5, 0.95])
def test_corruption_rates_match_alpha(t_value):
    """Over 64 x 4096 tokens the corrupted fraction is within 5 standard errors of 1 - alpha_t."""
    n_rows, length = 64, 4096
    x0 = VOCAB.real_ids[
        torch.randint(VOCAB.num_real, (n_rows, length), generator=torch.Generator().manual_seed(1))
    ]
    t = torch.full((n_rows,), t_value)
    ids = torch.arange(n_rows) + 1000
    p = 1 - alpha(t)[0].item()
    tolerance = 5 * (p * (1 - p) / x0.numel()) ** 0.5
    masked = NOISED["mdlm"].noise(x0, t, ids, VOCAB) == VOCAB.mask_id
    assert abs(masked.float().mean().item() - p) < tolerance
    xt = NOISED["duo"].noise(x0, t, ids, VOCAB)
    # a replaced token equals the original with probability 1/K
    k = VOCAB.num_real
    changed = p * (1 - 1 / k)
    assert abs((xt != x0).float().mean().item() - changed) < tolerance
    assert not torch.isin(xt, torch.tensor(sorted(VOCAB.excluded))).any()
    counts = torch.bincount(xt[xt != x0], minlength=VOCAB.size)[VOCAB.real]
    assert counts.min() > 0, "uniform noise misses real ids"
    mix = NOISED["gidd"].mixing(t[:1], k)  # GIDD: the mask with m_t, a real id with K b_t
    xt = NOISED["gidd"].noise(x0, t, ids, VOCAB)
    masked, replaced = xt == VOCAB.mask_id, (xt != x0) & (xt != VOCAB.mask_id)
    for share, p in ((masked, mix.mask.item()), (replaced, k * mix.uniform.item() * (1 - 1 / k))):
        assert abs(share.float().mean().item() - p) < 5 * (p * (1 - p) / x0.numel()) ** 0.5


def test_philox_known_answer():
    """Philox4x32-10 known-answer vector (Random123: key and counter all zero)."""
    words = philox4x32(torch.tensor([0]), torch.tensor([0]))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_row_keys_on_tensors_equal_the_integer_definition():
    """row_keys mixes on the ids' device with wrapping int64 arithmetic; it must give the
    bits of philox_key's uint64 arithmetic, for ids near both ends of the int64 range."""
    g = torch.Generator().manual_seed(11)
    ids = torch.cat([torch.randint(0, 2**62, (64,), generator=g), torch.tensor([0, 2**63 - 1])])
    for seed, stream in [(0, 1), (1234, 2), (2**64 - 1, 3)]:
        expected = [philox_key(seed, stream, i) for i in ids.tolist()]
        got = [k % 2**64 for k in row_keys(seed, stream, ids).tolist()]
        assert got == expected


@pytest.mark.parametrize("name", list(NOISED))
def test_noising_kernel_equals_its_twin_bit_for_bit(name, monkeypatch):
    """The Triton kernel (interpreted on CPU) draws the same words and writes the same xt,
    over a length that spans two programs and ends mid-block; so its rates are the twin's."""
    g = torch.Generator().manual_seed(5)
    x0 = VOCAB.real_ids[torch.randint(VOCAB.num_real, (6, 1500), generator=g)]
    t = torch.tensor([1e-3, 0.1, 0.4, 0.6, 0.9, 0.999])
    ids = torch.randperm(10_000, generator=g)[:6]
    twin = NOISED[name].noise(x0, t, ids, VOCAB)
    monkeypatch.setenv(KERNELS_ENV, "triton")
    kernel = NOISED[name].noise(x0, t, ids, VOCAB)
    assert (twin != x0).any() and torch.equal(kernel, twin)
