"""Each objective's losses against the float64 references of reference_losses.py (written from
docs/algorithms.md §4), on fresh random inputs: t from 1.2e-3 to 0.9995, masked / replaced and
clean positions (x0 == xt and x0 != xt), losses and logit gradients. The kernel backends and
the tensor-parallel split are covered in test_kernels.py on the same references.

Tolerance: relative error 1e-5 per token (float32 logits and float32 softmax, against float64;
the float32 rounding of a log-normaliser of size ~10 is ~1e-6), except Duo's logit gradient:
1e-4 relative to the row's largest entry, as its float32 backward (no cancelling sums are
kept, only per-token scalars) adds terms of size |g| r x̂_j that cancel to the result (seen up
to 5e-5 here). A wrong formula is off by O(1). Entries whose reference is zero (carried-over
MDLM tokens, the last AR position) must be exactly zero.
"""

from __future__ import annotations

import math

import pytest
import reference_losses as ref
import torch
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.pretrain.objectives import AR, MDLM, OBJECTIVES, Duo, build_objective
from dlm_pretrain.pretrain.objectives.schedule import EPS
from dlm_pretrain.pretrain.objectives.vocab import Vocab

V, B, L = 61, 6, 24
VOCAB = Vocab.build(V, mask_id=4, never_in_data=(3, 60))  # mask 4, pad 3, one padding id 60

# Every objective with each of its options; a new objective must add its cases here.
CASES = {
    "ar": AR(seed=5),
    "mdlm-elbo": MDLM(seed=5, loss_type="elbo"),
    "mdlm-ce": MDLM(seed=5, loss_type="cross_entropy"),
    "duo": Duo(seed=5),
}
GRAD_TOLERANCE = {"duo": 1e-4}  # else 1e-5; see the module docstring


def noised_inputs(case: str, seed: int, vocab: Vocab, shape=(B, L), dtype=torch.float32):
    """Fresh logits [B, L, V] (scale 3: peaked and flat rows), x0, xt (half of the tokens
    corrupted as the objective would: masked, or a uniform real id), t with both ends."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab.size, generator=g) * 3).to(dtype)
    x0 = vocab.real_ids[torch.randint(vocab.num_real, shape, generator=g)]
    others = vocab.real_ids[torch.randint(vocab.num_real, shape, generator=g)]
    replacement = torch.full_like(x0, vocab.mask_id) if case.startswith("mdlm") else others
    xt = torch.where(torch.rand(shape, generator=g) < 0.5, replacement, x0)
    if case == "ar":
        xt = x0
    t = torch.cat([torch.tensor([1.2e-3, 0.9995]), torch.rand(shape[0] - 2, generator=g)])
    t = t.clamp(EPS, 0.9995)
    weights = torch.rand(shape, generator=g) + 0.5  # upstream gradient of each token
    return logits, x0, xt, t, weights


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest error per row (last dimension), relative to the row's largest reference entry;
    rows whose reference is all zero (unscored) must be exactly zero in `got`."""
    got, expected = got.double().flatten(0, -2), expected.double().flatten(0, -2)
    scale = expected.abs().amax(-1)
    assert torch.all(got[scale == 0] == 0)
    return ((got - expected).abs().amax(-1)[scale > 0] / scale[scale > 0]).max().item()


def loss_and_grad(loss_fn, logits, x0, xt, t, weights, vocab, tp_group=None):
    """Per-token losses and d(sum of weights * loss)/d logits."""
    logits = logits.clone().requires_grad_()
    loss = loss_fn(logits, x0, xt, t, vocab, tp_group)
    (loss * weights[:, : loss.shape[1]]).sum().backward()
    return loss.detach(), logits.grad


def reference_loss_and_grad(reference, logits, x0, xt, t, weights, vocab):
    logits = logits.double().requires_grad_()
    loss = reference(logits, x0, xt, t, vocab)
    (loss * weights[:, : loss.shape[1]].double()).sum().backward()
    return loss.detach(), logits.grad


def test_every_objective_has_reference_cases():
    assert {type(o) for o in CASES.values()} == set(OBJECTIVES.values())
    assert CASES.keys() == ref.TRAINING.keys() == ref.VALIDATION.keys()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_training_loss_and_gradient_match_the_float64_reference(case, seed):
    objective = CASES[case]
    inputs = noised_inputs(case, seed, VOCAB)
    loss, grad = loss_and_grad(objective.per_token_loss, *inputs, VOCAB)
    expected, expected_grad = reference_loss_and_grad(ref.TRAINING[case], *inputs, VOCAB)
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    assert relative_error(loss.unsqueeze(-1), expected.unsqueeze(-1)) < 1e-5
    assert relative_error(grad, expected_grad) < GRAD_TOLERANCE.get(case, 1e-5)
    assert torch.all(grad[..., ~VOCAB.real] == 0)  # non-real ids get no gradient


@pytest.mark.parametrize("case", list(CASES))
def test_validation_loss_is_the_bound_whatever_the_training_loss(case):
    """MDLM trained with cross_entropy still validates on the ELBO (docs/pitfalls.md P18)."""
    logits, x0, xt, t, _ = noised_inputs(case, 2, VOCAB)
    got = CASES[case].validation_loss(logits, x0, xt, t, VOCAB)
    expected = ref.VALIDATION[case](logits, x0, xt, t, VOCAB)
    assert relative_error(got.unsqueeze(-1), expected.unsqueeze(-1)) < 1e-5


def test_duo_reference_forms_agree():
    """The two float64 references of docs/algorithms.md §4.3 agree, so either can stand for the
    formula."""
    logits, x0, xt, t, _ = noised_inputs("duo", 3, VOCAB)
    compact, expanded = (
        ref.duo_compact(logits, x0, xt, t, VOCAB),
        ref.duo_expanded(logits, x0, xt, t, VOCAB),
    )
    assert torch.allclose(compact, expanded, rtol=1e-7, atol=1e-9)


def test_duo_loss_is_zero_for_a_perfect_clean_prediction():
    _, x0, _, t, _ = noised_inputs("duo", 7, VOCAB)
    perfect = torch.full((B, L, V), -30.0).scatter(-1, x0[..., None], 30.0)
    assert Duo().per_token_loss(perfect, x0, x0, t, VOCAB).abs().max() < 1e-6


def test_duo_stays_accurate_at_small_t_with_a_large_vocabulary():
    """docs/pitfalls.md P13: the compact form in float32 loses the loss to cancellation at small
    t and large K; the rewritten form keeps 1e-5 relative accuracy."""
    vocab = Vocab.build(4096, mask_id=4, never_in_data=(3,))
    logits, x0, _, _, _ = noised_inputs("duo", 11, vocab, shape=(2, 8))
    xt = vocab.real_ids[torch.randint(vocab.num_real, (2, 8), generator=torch.Generator())]
    t = torch.tensor([1e-3, 2e-3])
    expected = ref.duo_compact(logits, x0, xt, t, vocab)
    k, real = vocab.num_real, vocab.real  # the compact form again, in float32
    p = torch.softmax(logits.masked_fill(~real, -math.inf), -1)[..., real]  # float32
    a = (1 - (1 - EPS) * t)[:, None, None]
    index = torch.cumsum(real.long(), 0) - 1
    bar = k * a * torch.nn.functional.one_hot(index[x0], k).float() + (1 - a)
    bar_theta = k * a * p + (1 - a)
    z = index[xt][..., None]
    bar_z, bar_theta_z = bar.gather(-1, z), bar_theta.gather(-1, z)
    s = (bar / bar_z * torch.log(bar_theta_z * bar / (bar_theta * bar_z))).sum(-1, keepdim=True)
    float32 = (-(1 - EPS) / (k * a) * (k / bar_z - k / bar_theta_z - s)).squeeze(-1)
    naive = ((float32.double() - expected).abs() / expected.abs()).max().item()
    loss = Duo().per_token_loss(logits, x0, xt, t, vocab)
    ours = ((loss.double() - expected).abs() / expected.abs()).max().item()
    assert ours < 1e-5 < naive


def test_objectives_are_built_from_the_config_section():
    class Section:  # the attributes build_objective reads
        name, seed, loss_type = "mdlm", 9, "cross_entropy"

    assert build_objective(Section()) == MDLM(seed=9, loss_type="cross_entropy")
    Section.name = "duo"
    assert build_objective(Section()) == Duo(seed=9)  # loss_type is MDLM's alone
    with pytest.raises(ConfigError, match=r"objective\.loss_type='low_var'"):
        MDLM(loss_type="low_var")
