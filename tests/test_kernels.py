"""The losses on both kernel backends (the chunked twins and the Triton kernels, interpreted on
CPU: conftest sets TRITON_INTERPRET=1) against the float64 references of reference_losses.py:
losses and logit gradients on fresh random inputs, with a vocabulary that is not a multiple of
the block size and excluded ids in every block, t near 1e-3 and near 1, x0 == xt and x0 != xt,
masked and unmasked positions; bf16 logits within bf16 tolerance; and two tensor-parallel
ranks, each holding half of the vocabulary, against the same references.

Tolerances as in test_objectives.py (1e-5; Duo's float32 logit gradient 1e-4).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import reference_losses as ref
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_distributed
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.parallel.head import HeadInput
from dlm_pretrain.pretrain.kernels import KERNELS_ENV, chunked, losses
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from test_objectives import (
    CASES,
    GRAD_TOLERANCE,
    loss_and_grad,
    noised_inputs,
    reference_loss_and_grad,
    relative_error,
)

BACKENDS = ["chunked", "triton"]
# Every kernel path once: Eso-LM's losses are MDLM's cross-entropy, and GIDD's weightings
# differ only in the per-token algebra around the same Duo statistics.
KERNEL_CASES = [
    c for c in CASES if not c.startswith("esolm") and c not in ("gidd-dynamic", "gidd-clip")
]

V, B, L = 2 * chunked.CHUNK + 78, 4, 10  # three blocks, the last one partial; even
VOCAB = Vocab.build(V, mask_id=4, never_in_data=(3, chunked.CHUNK, V - 1))


def _check(case, inputs, loss, grad, grad_tolerance=None) -> None:
    expected, expected_grad = reference_loss_and_grad(ref.TRAINING[case], *inputs, VOCAB)
    assert relative_error(loss.unsqueeze(-1), expected.unsqueeze(-1)) < 1e-5, case
    tolerance = grad_tolerance or GRAD_TOLERANCE.get(case, 1e-5)
    assert relative_error(grad.float(), expected_grad) < tolerance, case
    assert torch.all(grad[..., ~VOCAB.real] == 0), case


@pytest.fixture(params=BACKENDS)
def kernels(request, monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, request.param)
    return request.param


@pytest.mark.parametrize("case", KERNEL_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_kernels_match_float64_reference(kernels, case, seed):
    inputs = noised_inputs(case, seed, VOCAB, shape=(B, L))
    x0, xt = inputs[1], inputs[2]
    assert case == "ar" or ((xt == x0).any() and (xt != x0).any())
    _check(case, inputs, *loss_and_grad(CASES[case], *inputs, VOCAB))


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernels_take_bf16_logits(kernels, case):
    """bf16 logits are read as they are and widened to float32; the gradient comes back in
    bf16, so it is within bf16 rounding (2^-8 relative) of the float64 reference on the same
    bf16 values; the losses keep 1e-5."""
    inputs = noised_inputs(case, 2, VOCAB, shape=(B, L), dtype=torch.bfloat16)
    loss, grad = loss_and_grad(CASES[case], *inputs, VOCAB)
    assert grad.dtype == torch.bfloat16
    _check(case, inputs, loss, grad, grad_tolerance=1e-2)


def _split(rank: int, world_size: int, backend: str, out: Path) -> None:
    os.environ[KERNELS_ENV] = backend
    results = {}
    for case in KERNEL_CASES:
        logits, *rest = noised_inputs(case, 3, VOCAB, shape=(B, L))
        objective = CASES[case]
        loss, grad = loss_and_grad(objective, logits, *rest, VOCAB, dist.group.WORLD)
        dist.all_reduce(grad)  # each rank's logit-gradient columns, as the tensor group sums
        results[case] = (loss, grad)
    if rank == 0:
        torch.save(results, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_matches_float64_reference(tmp_path, backend):
    """Two ranks with half the vocabulary each (excluded ids in both halves; x0 and xt ids
    on both): the loss (the same on every rank) and the gathered gradient against the
    unsplit reference."""
    run_distributed(_split, 2, backend, tmp_path / "tp2.pt")
    split = torch.load(tmp_path / "tp2.pt")
    for case in KERNEL_CASES:
        _check(case, noised_inputs(case, 3, VOCAB, shape=(B, L)), *split[case])


def test_unknown_backend_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "cuda")
    with pytest.raises(ConfigError, match="DLM_KERNELS='cuda'; use triton or chunked"):
        loss_and_grad(CASES["ar"], *noised_inputs("ar", 4, VOCAB), VOCAB)


def _head(case: str, seed: int, dtype=torch.float32) -> tuple[HeadInput, tuple]:
    """A random head (hidden [L, B, d], weight [V, d], bias [V], leaves) and its labels."""
    g = torch.Generator().manual_seed(seed)
    _, *labels = noised_inputs(case, seed, VOCAB, shape=(B, L))
    hidden = torch.randn(L, B, 16, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, 16, generator=g) / 2).requires_grad_()
    bias = torch.randn(V, generator=g).requires_grad_()
    return HeadInput(hidden, weight, bias, None), labels


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_fused_head_and_loss_equal_the_materialised_logits(kernels, case, monkeypatch):
    """Today's computation (the head's full logits [B, L, V], then the loss) against the fused
    one over blocks of 7 rows: the loss and the gradients of the hidden, the weight and the
    bias agree to 1e-6 in float32 (relative to each tensor's largest entry)."""
    monkeypatch.setattr(losses, "BLOCK_BYTES", 7 * 4 * V)
    assert losses.rows_per_block(V) == 7
    objective = CASES[case]
    head, labels = _head(case, 5)
    fused = objective.train_loss(head, *labels, VOCAB)
    fused_grads = torch.autograd.grad(fused, (head.hidden, head.weight, head.bias))
    logits = F.linear(head.hidden, head.weight, head.bias)  # [L, B, V]
    whole = HeadInput(logits, torch.eye(V), torch.zeros(V), None)
    materialised = objective.train_loss(whole, *labels, VOCAB)
    grads = torch.autograd.grad(materialised, (head.hidden, head.weight, head.bias))
    assert torch.isclose(fused, materialised, rtol=1e-6, atol=0)
    for got, expected in zip(fused_grads, grads, strict=True):
        assert (got - expected).abs().max() <= 1e-6 * expected.abs().max(), case


@pytest.mark.parametrize("case", ["mdlm-elbo", "ar"])
def test_the_head_runs_only_on_the_rows_a_loss_reads(case):
    """MDLM reads its masked positions, AR all but the last: NaN hidden states anywhere else
    leave the loss finite and get a zero gradient."""
    head, (x0, xt, t) = _head(case, 6)
    unread = xt != VOCAB.mask_id
    if case == "ar":  # its last position predicts nothing
        unread = torch.zeros_like(xt, dtype=torch.bool).index_fill_(1, torch.tensor(L - 1), True)
    unread = unread.t()  # as the hidden's [L, B]
    hidden = head.hidden.detach().masked_fill(unread.unsqueeze(-1), float("nan"))
    hidden.requires_grad_()
    loss = CASES[case].train_loss(replace(head, hidden=hidden), x0, xt, t, VOCAB)
    assert loss.isfinite()
    loss.backward()
    assert torch.all(hidden.grad[unread] == 0) and hidden.grad[~unread].abs().sum() > 0
