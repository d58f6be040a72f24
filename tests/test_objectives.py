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
import torch.distributed as dist
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.parallel.head import HeadInput
from dlm_pretrain.pretrain.objectives import (
    AR,
    GIDD,
    MDLM,
    OBJECTIVES,
    Duo,
    EsoLM,
    build_objective,
)
from dlm_pretrain.pretrain.objectives.mdlm import LOSS_TYPES
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
    "gidd-dynamic": GIDD(seed=5, p_uniform=0.1),
    "gidd-clip": GIDD(seed=5, p_uniform=0.1, loss_weighting="clip"),
    "gidd-elbo": GIDD(seed=5, p_uniform=0.2, gamma=1.5, loss_weighting="elbo"),
    "esolm-elbo": EsoLM(seed=5, loss_type="elbo"),
    "esolm-ce": EsoLM(seed=5, loss_type="cross_entropy"),
}
# else 1e-5; see the module docstring (GIDD's gradient is Duo's statistics')
GRAD_TOLERANCE = {"duo": 1e-4} | {case: 1e-4 for case in CASES if case.startswith("gidd")}


def noised_inputs(case: str, seed: int, vocab: Vocab, shape=(B, L), dtype=torch.float32):
    """Fresh logits [B, L, V] (scale 3: peaked and flat rows), x0, xt (half of the tokens
    corrupted as the objective would: masked, or a uniform real id; GIDD: a third each
    masked, uniform and clean), t with both ends."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab.size, generator=g) * 3).to(dtype)
    x0 = vocab.real_ids[torch.randint(vocab.num_real, shape, generator=g)]
    others = vocab.real_ids[torch.randint(vocab.num_real, shape, generator=g)]
    masks = case.startswith(("mdlm", "esolm"))
    replacement = torch.full_like(x0, vocab.mask_id) if masks else others
    u = torch.rand(shape, generator=g)
    xt = torch.where(u < 0.5, replacement, x0)
    if case.startswith("gidd"):
        xt = torch.where(u < 1 / 3, vocab.mask_id, torch.where(u < 2 / 3, others, x0))
    if case == "ar":
        xt = x0
    t = torch.cat([torch.tensor([1.2e-3, 0.9995]), torch.rand(shape[0] - 2, generator=g)])
    t = t.clamp(EPS, 0.9995)
    return logits, x0, xt, t


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest error per row (last dimension), relative to the row's largest reference entry;
    rows whose reference is all zero (unscored) must be exactly zero in `got`."""
    got, expected = got.double().flatten(0, -2), expected.double().flatten(0, -2)
    scale = expected.abs().amax(-1)
    assert torch.all(got[scale == 0] == 0)
    return ((got - expected).abs().amax(-1)[scale > 0] / scale[scale > 0]).max().item()


def logits_head(logits, group=None) -> HeadInput:
    """A head whose logits are `logits` [B, L, V] exactly: hidden = the logits in the head's
    [L, B, V] layout (a leaf), and this rank's rows of the identity (with a zero bias) as the
    head, so the gradient with respect to the hidden is the one with respect to the logits
    (summed over the ranks)."""
    width = logits.shape[-1] // (1 if group is None else group.size())
    start = 0 if group is None else dist.get_rank(group) * width
    eye = torch.eye(logits.shape[-1])[start : start + width]
    hidden = logits.transpose(0, 1).contiguous().requires_grad_()
    return HeadInput(hidden, eye, torch.zeros(width), group)


def loss_and_grad(objective, logits, x0, xt, t, vocab, group=None):
    """Per-token losses and d(token mean of the loss)/d logits (the training loss)."""
    head = logits_head(logits, group)
    loss = objective.per_token_loss(head, x0, xt, t, vocab)
    objective.train_loss(head, x0, xt, t, vocab).backward()
    return loss, head.hidden.grad.transpose(0, 1)


def reference_loss_and_grad(reference, logits, x0, xt, t, vocab):
    logits = logits.double().requires_grad_()
    loss = reference(logits, x0, xt, t, vocab)
    loss.mean().backward()
    return loss.detach(), logits.grad


def test_every_objective_has_reference_cases():
    assert {type(o) for o in CASES.values()} == set(OBJECTIVES.values())
    assert CASES.keys() == ref.TRAINING.keys() == ref.VALIDATION.keys()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_training_loss_and_gradient_match_the_float64_reference(case, seed):
    objective = CASES[case]
    inputs = noised_inputs(case, seed, VOCAB)
    loss, grad = loss_and_grad(objective, *inputs, VOCAB)
    expected, expected_grad = reference_loss_and_grad(ref.TRAINING[case], *inputs, VOCAB)
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    assert relative_error(loss.unsqueeze(-1), expected.unsqueeze(-1)) < 1e-5
    assert relative_error(grad, expected_grad) < GRAD_TOLERANCE.get(case, 1e-5)
    assert torch.all(grad[..., ~VOCAB.real] == 0)  # non-real ids get no gradient


@pytest.mark.parametrize("case", list(CASES))
def test_validation_loss_is_the_bound_whatever_the_training_loss(case):
    """MDLM trained with cross_entropy still validates on the ELBO (docs/pitfalls.md P18)."""
    logits, x0, xt, t = noised_inputs(case, 2, VOCAB)
    got = CASES[case].validation_loss(logits_head(logits), x0, xt, t, VOCAB)
    expected = ref.VALIDATION[case](logits, x0, xt, t, VOCAB)
    assert relative_error(got.unsqueeze(-1), expected.unsqueeze(-1)) < 1e-5


def test_duo_reference_forms_agree():
    """The two float64 references of docs/algorithms.md §4.3 agree, so either can stand for the
    formula."""
    logits, x0, xt, t = noised_inputs("duo", 3, VOCAB)
    compact, expanded = (
        ref.duo_compact(logits, x0, xt, t, VOCAB),
        ref.duo_expanded(logits, x0, xt, t, VOCAB),
    )
    assert torch.allclose(compact, expanded, rtol=1e-7, atol=1e-9)


def test_duo_loss_is_zero_for_a_perfect_clean_prediction():
    _, x0, _, t = noised_inputs("duo", 7, VOCAB)
    perfect = torch.full((B, L, V), -30.0).scatter(-1, x0[..., None], 30.0)
    assert Duo().per_token_loss(logits_head(perfect), x0, x0, t, VOCAB).abs().max() < 1e-6


def test_duo_stays_accurate_at_small_t_with_a_large_vocabulary():
    """docs/pitfalls.md P13: the compact form in float32 loses the loss to cancellation at small
    t and large K; the rewritten form keeps 1e-5 relative accuracy."""
    vocab = Vocab.build(4096, mask_id=4, never_in_data=(3,))
    logits, x0, _, _ = noised_inputs("duo", 11, vocab, shape=(2, 8))
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
    loss = Duo().per_token_loss(logits_head(logits), x0, xt, t, vocab)
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


def test_gidd_approaches_the_masked_elbo_as_the_uniform_share_vanishes():
    """p_u -> 0 (floored at e^-20) leaves a masked process: a masked token's loss is MDLM's
    ELBO (1/t) CE up to b_t / (alpha_t x̂_x) (1e-5 here, where t = 0.9995 meets an x̂_x of
    1e-5), and a clean token's loss falls with B (~1000x from p_u 1e-5 to 1e-8). r = alpha_t /
    b_t reaches 1e13 there, and the loss still holds the float64 reference to 1e-6."""
    logits, x0, xt, t = noised_inputs("gidd-elbo", 8, VOCAB)
    masked = xt == VOCAB.mask_id
    gidd = GIDD(p_uniform=0.0, loss_weighting="elbo").per_token_loss(
        logits_head(logits), x0, xt, t, VOCAB
    )
    mdlm = MDLM(loss_type="elbo").per_token_loss(logits_head(logits), x0, xt, t, VOCAB)
    assert relative_error(gidd[masked][:, None], mdlm[masked][:, None]) < 1e-4
    expected = ref.gidd(0.0, 1.0, "elbo")(logits, x0, xt, t, VOCAB)
    assert relative_error(gidd.unsqueeze(-1), expected.unsqueeze(-1)) < 1e-6
    clean = (xt == x0) & (t[:, None] < 0.9)  # near t = 1, r x̂_x >> 1 needs a smaller p_u
    small, smaller = (
        GIDD(p_uniform=p, loss_weighting="elbo").per_token_loss(
            logits_head(logits), x0, xt, t, VOCAB
        )[clean]
        for p in (1e-5, 1e-8)
    )
    assert clean.any() and (smaller < small / 500).all()
    assert smaller.max() < 1e-4 * mdlm[masked].mean()


def test_gidd_mixing_is_a_distribution_with_the_chosen_uniform_share():
    t = torch.tensor([1e-3, 0.25, 0.5, 0.75, 0.999], dtype=torch.float64)
    for p_u, gamma in [(0.1, 1.0), (0.3, 1.0), (0.2, 2.0), (0.05, 0.5)]:
        mix = GIDD(p_uniform=p_u, gamma=gamma).mixing(t, VOCAB.num_real)
        total = mix.alpha + mix.mask + VOCAB.num_real * mix.uniform
        assert torch.allclose(total, torch.ones_like(t), atol=1e-15, rtol=0)
        a, bp = ref.gidd_mixing(t, VOCAB, p_u, gamma)  # written from the docs, not the code
        assert torch.allclose(mix.alpha, a[:, 0]) and torch.allclose(mix.mask, bp[:, 4])
        h = 1e-6
        above, below = (GIDD(p_uniform=p_u, gamma=gamma).mixing(t + d, 1) for d in (h, -h))
        assert torch.allclose(mix.c_prime, (above.c - below.c) / (2 * h), rtol=1e-6)
        if gamma == 1.0:
            half = GIDD(p_uniform=p_u).mixing(torch.tensor(0.5), VOCAB.num_real)
            assert abs(VOCAB.num_real * half.uniform.item() - p_u) < 1e-12
    assert GIDD().mixing(torch.tensor(1 - 1e-9), VOCAB.num_real).alpha < 1e-8


def test_gidd_loss_is_zero_for_a_perfect_clean_prediction():
    _, x0, _, t = noised_inputs("gidd-elbo", 7, VOCAB)
    perfect = torch.full((B, L, V), -30.0).scatter(-1, x0[..., None], 30.0)
    for weighting in ("elbo", "dynamic"):
        loss = GIDD(loss_weighting=weighting).per_token_loss(logits_head(perfect), x0, x0, t, VOCAB)
        assert loss.abs().max() < 1e-6


def test_gidd_reverse_step_is_the_posterior_of_its_forward_process():
    """With x̂ = one-hot(x) the step's normaliser sum_v q(z|v) q_s(v|x) is q_t(z|x) for every
    z (the transition from s to t carries q_s to q_t, checked against the reference mixing);
    the last step (s = 0) never yields the mask."""
    gidd = GIDD(p_uniform=0.2, gamma=1.5)
    x = VOCAB.real_ids[torch.randperm(VOCAB.num_real, generator=torch.Generator())[:8]]
    z = torch.cat([x[:3], torch.full((3,), VOCAB.mask_id), x.flip(0)[:2]])[None]
    x_hat = torch.nn.functional.one_hot(x, V).double()[None]
    for t, s in [(0.9, 0.6), (0.5, 0.45), (0.3, 0.0)]:
        p = gidd._reverse_step(z, x_hat, torch.tensor(t).double(), torch.tensor(s).double(), VOCAB)
        assert (p >= 0).all()
        a, bp = ref.gidd_mixing(torch.tensor([t]), VOCAB, 0.2, 1.5)
        q_t = a * torch.nn.functional.one_hot(x, V).double() + bp  # [8, V] rows q_t(.|x)
        assert torch.allclose(p.sum(-1)[0], q_t.gather(-1, z[0][:, None])[:, 0], rtol=1e-12)
        if s == 0.0:
            assert (p[..., VOCAB.mask_id] == 0).all()


def test_gidd_refuses_options_outside_their_range():
    with pytest.raises(ConfigError, match=r"objective\.gamma=2\.5"):
        GIDD(gamma=2.5)
    with pytest.raises(ConfigError, match=r"objective\.loss_weighting='none'"):
        GIDD(loss_weighting="none")
    with pytest.raises(ConfigError, match=r"objective\.p_uniform=1"):
        GIDD(p_uniform=1)


def test_eso_lm_batch_is_mdlm_noise_sorted_clean_first():
    """alpha_0 = 1: the inputs are MDLM's xt on the same draws, each row permuted so that its
    clean tokens come first; targets and positions follow the same permutation, so the
    per-token losses are MDLM's, permuted, and their sum is MDLM's."""
    logits, x0, _, t = noised_inputs("esolm-elbo", 9, VOCAB)
    ids = torch.arange(B) + 100
    (xt, s, positions), (x0_sorted, xt_again, t_again) = EsoLM(seed=5).batch(x0, t, ids, VOCAB)
    natural = MDLM(seed=5).noise(x0, t, ids, VOCAB)
    assert torch.equal(positions.sort(1).values, torch.arange(L).expand(B, L))
    assert torch.equal(xt, natural.gather(1, positions)) and torch.equal(xt, xt_again)
    assert torch.equal(t, t_again)
    assert torch.equal(x0_sorted, x0.gather(1, positions)) and (s == 0).all()
    masked = xt == VOCAB.mask_id
    assert masked.any() and (~masked).any()
    assert torch.equal(masked, masked.long().sort(1).values.bool())  # clean, then masked
    sorted_logits = logits.gather(1, positions[..., None].expand_as(logits))
    for loss_type in LOSS_TYPES:
        eso = EsoLM(loss_type=loss_type).per_token_loss(
            logits_head(sorted_logits), x0_sorted, xt, t, VOCAB
        )
        mdlm = MDLM(loss_type=loss_type).per_token_loss(logits_head(logits), x0, natural, t, VOCAB)
        assert torch.equal(eso, mdlm.gather(1, positions))
    other = EsoLM(seed=6).batch(x0, t, ids, VOCAB)[0][2]
    assert not torch.equal(other, positions)  # the order is drawn, not fixed


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_eso_lm_both_branches_match_the_float64_reference(loss_type):
    """alpha_0 = batch_split = 1/2: half the rows diffuse (alpha_0-scaled schedule), half are
    sequential (z_0 masks a half, left to right, beside the clean x). The inputs hold
    [diffusion | z-halves | x-halves]; the losses and gradients equal the reference, whose
    token mean is the sum of the two branches' token means."""
    esolm = EsoLM(seed=3, loss_type=loss_type, alpha_0=0.5, batch_split=0.5)
    _, x0, _, t = noised_inputs("esolm-elbo", 10, VOCAB)
    inputs, (x0_sorted, xt, t_rows) = esolm.batch(x0, t, torch.arange(B), VOCAB)
    tokens, s, pos_d, pos_s = inputs
    assert s.shape == (B + B // 2,) and (s == 0).all()
    half = B // 2
    assert tokens.shape == (B + half, L) and pos_d.shape == pos_s.shape == (half, L)
    assert torch.equal(t_rows, torch.cat([t[0::2], torch.zeros(half)]))  # rows 0, 2, 4 diffuse
    assert torch.equal(tokens[B:], x0[1::2].gather(1, pos_s))  # x-halves: the true tokens
    z_masked = tokens[half:B] == VOCAB.mask_id
    masked_positions = torch.where(z_masked, pos_s, -1)
    assert torch.equal(masked_positions.sort(1).values, masked_positions.cummax(1).values)
    assert 0.3 < z_masked.float().mean() < 0.7 and torch.equal(xt[half:], tokens[half:B])
    logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(4)) * 3
    inputs = (logits, x0_sorted, xt, t_rows)
    loss, grad = loss_and_grad(esolm, *inputs, VOCAB)
    expected, expected_grad = reference_loss_and_grad(ref.esolm(0.5, loss_type), *inputs, VOCAB)
    assert relative_error(loss.unsqueeze(-1), expected.unsqueeze(-1)) < 1e-5
    assert relative_error(grad, expected_grad) < 1e-5
    short = esolm.batch(x0[:3], t[:3], torch.arange(3), VOCAB)  # a short validation chunk
    assert [len(x) for x in short[1]] == [2, 2, 2] and len(short[0][0]) == 3  # 1 d + 1 (z, x)
    unscaled = expected / 2  # each branch holds half of the rows
    branch_means = unscaled[:half].mean() + unscaled[half:].mean()
    assert torch.isclose(loss.double().mean(), branch_means, rtol=1e-6)
