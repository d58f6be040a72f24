"""Each loss against a float64 reference written from ALGORITHMS.md §4, on fresh random inputs.

Tolerance: relative error 1e-5 per token (float32 logits; the references run in float64).
Entries whose reference is zero (carried-over MDLM tokens) must be exactly zero.
"""

from __future__ import annotations

import math

import pytest
import torch
from dlm_pretrain.pretrain.objectives import ar, duo, mdlm
from dlm_pretrain.pretrain.objectives.schedule import EPS
from dlm_pretrain.pretrain.objectives.vocab import Vocab

V, B, L = 61, 6, 24
VOCAB = Vocab.build(V, mask_id=4, never_in_data=(3, 60))  # mask 4, pad 3, one padding id 60
REAL = VOCAB.real


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g) * 3
    real_ids = VOCAB.real_ids
    x0 = real_ids[torch.randint(len(real_ids), (B, L), generator=g)]
    t = torch.tensor([1.2e-3, 2e-3, 0.1, 0.5, 0.97, 0.9995])
    return logits, x0, t, g


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    nonzero = ref != 0
    assert torch.all(got[~nonzero] == 0)
    return ((got[nonzero].double() - ref[nonzero]).abs() / ref[nonzero].abs()).max().item()


def _ref_log_probs(logits: torch.Tensor, vocab: Vocab = VOCAB) -> torch.Tensor:
    """float64 log softmax over the real ids; -inf elsewhere."""
    z = logits.double().masked_fill(~vocab.real, -math.inf)
    return z - torch.logsumexp(z, -1, keepdim=True)


def _alpha(t):
    return 1 - (1 - EPS) * t.double()


@pytest.mark.parametrize("seed", [0, 1])
def test_ar_is_next_token_nll(seed):
    logits, x0, t, _ = _inputs(seed)
    ref = -_ref_log_probs(logits)[:, :-1].gather(-1, x0[:, 1:, None]).squeeze(-1)
    got = ar.per_token_loss(logits, x0, x0, t, VOCAB)
    assert got.shape == (B, L - 1) and got.dtype == torch.float32
    assert _rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("loss_type", ["elbo", "cross_entropy"])
def test_mdlm_matches_reference(loss_type):
    logits, x0, t, g = _inputs(2)
    xt = torch.where(torch.rand(B, L, generator=g) < 0.5, VOCAB.mask_id, x0)
    ce = -_ref_log_probs(logits).gather(-1, x0[..., None]).squeeze(-1)
    weight = 1 / t.double()[:, None] if loss_type == "elbo" else 1.0
    ref = torch.where(xt == VOCAB.mask_id, ce * weight, 0.0)
    got = mdlm.per_token_loss(logits, x0, xt, t, VOCAB, loss_type=loss_type)
    assert _rel_err(got, ref) < 1e-5
    assert torch.equal(
        mdlm.validation_loss(logits, x0, xt, t, VOCAB),
        mdlm.per_token_loss(logits, x0, xt, t, VOCAB, loss_type="elbo"),
    )


def _duo_compact(logits, x0, xt, t, vocab: Vocab = VOCAB):
    """§4.3 compact form, over the K real ids, float64."""
    k, real = vocab.num_real, vocab.real
    p = _ref_log_probs(logits, vocab).exp()[..., real]  # [B, L, K]
    real_index = torch.cumsum(real.long(), 0) - 1
    x, z = real_index[x0], real_index[xt]
    a = _alpha(t)[:, None, None]
    a_prime = -(1 - EPS)
    bar = k * a * torch.nn.functional.one_hot(x, k).double() + (1 - a)
    bar_theta = k * a * p + (1 - a)
    bar_z = bar.gather(-1, z[..., None])
    bar_theta_z = bar_theta.gather(-1, z[..., None])
    sum_term = (bar / bar_z * torch.log(bar_theta_z * bar / (bar_theta * bar_z))).sum(
        -1, keepdim=True
    )
    out = a_prime / (k * a) * (k / bar_z - k / bar_theta_z - sum_term)
    return out.squeeze(-1)


def _duo_expanded(logits, x0, xt, t):
    """§4.3 expanded form as the reference code organises it, float64."""
    k = VOCAB.num_real
    p = _ref_log_probs(logits).exp()[..., REAL]
    real_index = torch.cumsum(REAL.long(), 0) - 1
    x, z = real_index[x0], real_index[xt]
    a = _alpha(t)[:, None]
    a_prime = -(1 - EPS)
    delta = (x == z).double()
    c = (1 - a) / (k * a + 1 - a)
    bar_theta = k * a[..., None] * p + (1 - a[..., None])
    s = torch.log(bar_theta).sum(-1)
    log_theta_z = torch.log(bar_theta.gather(-1, z[..., None]).squeeze(-1))
    log_theta_x = torch.log(bar_theta.gather(-1, x[..., None]).squeeze(-1))
    coeff = a_prime / (k * a)
    term1 = k * (1 / ((1 - a) + k * a * delta) - 1 / log_theta_z.exp())
    offset = ((k - 1) * c * delta - (1 / c) * (1 - delta)) * torch.log(c)
    theta = -(delta * c + (1 - delta)) * (s - k * log_theta_z) - (1 - delta) * (k * a / (1 - a)) * (
        log_theta_x - log_theta_z
    )
    return coeff * (term1 - (theta + offset))


def test_duo_reference_forms_agree():
    logits, x0, t, g = _inputs(3)
    xt = torch.where(
        torch.rand(B, L, generator=g) < 0.5,
        VOCAB.real_ids[torch.randint(VOCAB.num_real, (B, L), generator=g)],
        x0,
    )
    compact, expanded = _duo_compact(logits, x0, xt, t), _duo_expanded(logits, x0, xt, t)
    assert torch.allclose(compact, expanded, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_duo_matches_reference_at_small_and_large_t(seed):
    logits, x0, t, g = _inputs(seed)
    others = VOCAB.real_ids[torch.randint(VOCAB.num_real, (B, L), generator=g)]
    xt = torch.where(torch.rand(B, L, generator=g) < 0.5, others, x0)
    assert (xt == x0).any() and (xt != x0).any()
    ref = _duo_compact(logits, x0, xt, t)
    got = duo.per_token_loss(logits, x0, xt, t, VOCAB)
    assert got.dtype == torch.float32 and got.shape == (B, L)
    assert _rel_err(got, ref) < 1e-5


def test_duo_loss_is_zero_for_a_perfect_clean_prediction():
    _, x0, t, _ = _inputs(7)
    perfect = torch.full((B, L, V), -30.0).scatter(-1, x0[..., None], 30.0)
    loss = duo.per_token_loss(perfect, x0, x0, t, VOCAB)
    assert loss.abs().max() < 1e-6


@pytest.mark.parametrize("fused", [False, True])
def test_duo_stays_accurate_at_small_t_with_a_large_vocabulary(fused):
    """Pitfall P13: the compact form in float32 loses the loss to cancellation at small t and
    large K; the rewritten form keeps 1e-5 relative accuracy."""
    vocab = Vocab.build(4096, mask_id=4, never_in_data=(3,))
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 8, vocab.size, generator=g) * 3
    x0 = vocab.real_ids[torch.randint(vocab.num_real, (2, 8), generator=g)]
    xt = vocab.real_ids[torch.randint(vocab.num_real, (2, 8), generator=g)]
    t = torch.tensor([1e-3, 2e-3])
    k, real = vocab.num_real, vocab.real

    def compact(dtype):
        z = logits.to(dtype).masked_fill(~real, -math.inf)
        p = torch.softmax(z, -1)[..., real]
        index = torch.cumsum(real.long(), 0) - 1
        x, zz = index[x0], index[xt]
        a = (1 - (1 - EPS) * t.to(dtype))[:, None, None]
        bar = k * a * torch.nn.functional.one_hot(x, k).to(dtype) + (1 - a)
        bar_theta = k * a * p + (1 - a)
        bar_z, bar_theta_z = bar.gather(-1, zz[..., None]), bar_theta.gather(-1, zz[..., None])
        s = (bar / bar_z * torch.log(bar_theta_z * bar / (bar_theta * bar_z))).sum(-1, keepdim=True)
        return (-(1 - EPS) / (k * a) * (k / bar_z - k / bar_theta_z - s)).squeeze(-1)

    ref = compact(torch.float64)
    naive = ((compact(torch.float32).double() - ref).abs() / ref.abs()).max().item()
    loss = duo.per_token_loss(logits, x0, xt, t, vocab, fused=fused)
    ours = ((loss.double() - ref).abs() / ref.abs()).max()
    assert ours < 1e-5 < naive


def _mdlm_reference(logits, x0, xt, t, vocab: Vocab = VOCAB):
    ce = -_ref_log_probs(logits, vocab).gather(-1, x0[..., None]).squeeze(-1)
    return torch.where(xt == vocab.mask_id, ce / t.double()[:, None], 0.0)


def _ar_reference(logits, x0, xt, t, vocab: Vocab = VOCAB):
    return -_ref_log_probs(logits, vocab)[:, :-1].gather(-1, x0[:, 1:, None]).squeeze(-1)


REFERENCES = {"ar": _ar_reference, "mdlm": _mdlm_reference, "duo": _duo_compact}


@pytest.mark.parametrize("objective", [ar, mdlm, duo], ids=["ar", "mdlm", "duo"])
def test_gradients_match_float64_reference(objective):
    """d(sum of w * loss)/d logits against autograd through the float64 reference, at t from
    1.2e-3 to 0.9995, with masked / replaced and clean positions."""
    logits, x0, t, g = _inputs(8)
    replacement = VOCAB.mask_id if objective is mdlm else VOCAB.real_ids[9]
    xt = torch.where(torch.rand(B, L, generator=g) < 0.5, replacement, x0)
    weights = torch.rand(B, L, generator=g) + 0.5
    ours = logits.clone().requires_grad_()
    loss = objective.per_token_loss(ours, x0, xt, t, VOCAB)
    (loss * weights[:, : loss.shape[1]]).sum().backward()
    ref = logits.double().requires_grad_()
    ref_loss = REFERENCES[objective.__name__.rsplit(".", 1)[-1]](ref, x0, xt, t)
    (ref_loss * weights[:, : ref_loss.shape[1]].double()).sum().backward()
    real = REAL.expand_as(logits)
    assert torch.all(ours.grad[~real] == 0)  # non-real ids get no gradient
    scale = ref.grad.abs().amax(-1)  # zero on unscored positions: ours must be zero there
    assert torch.all(ours.grad[scale == 0] == 0)
    err = (ours.grad.double() - ref.grad).abs().amax(-1)[scale > 0] / scale[scale > 0]
    assert err.max() < 1e-5
