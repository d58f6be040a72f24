"""The smoke check's kernel comparisons: every Triton kernel against its chunked PyTorch twin
(docs/conventions.md §11) on the same inputs, the fused head with the cross-entropy and Duo
losses forward and backward in float32 and bf16 and the MDLM, Duo and GIDD noising, with the
largest relative error and the time of each backend. Kept apart from launch.smoke, which runs
them among its other checks, because building the inputs and tolerances is its own concern.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from functools import partial

import torch
from dlm_pretrain.launch.smoke_check import FAIL, PASS, SKIP, Check, attempt, timed
from dlm_pretrain.parallel.groups import Runtime
from dlm_pretrain.parallel.head import HeadInput
from dlm_pretrain.pretrain.kernels import KERNELS_ENV
from dlm_pretrain.pretrain.objectives import AR, GIDD, MDLM, Duo, Objective
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor

# Kernel inputs: tokens, vocabulary (Llama's with the mask on GPU; on CPU, for interpreted
# Triton, small with ragged last blocks), noised [B, L], timed calls after the first (CPU:
# none, the first one is timed; the interpreter compiles nothing).
KERNEL_SIZES = {"cuda": (4096, 32001, (64, 4096), 10), "cpu": (64, 1102, (4, 1500), 0)}
HEAD_DIM = {"cuda": 768, "cpu": 16}  # the head's input width in the fused head+loss checks


@contextlib.contextmanager
def _kernels(backend: str) -> Iterator[None]:
    """DLM_KERNELS=backend meanwhile (read by pretrain.kernels.backend_name)."""
    saved = os.environ.get(KERNELS_ENV)
    os.environ[KERNELS_ENV] = backend
    try:
        yield
    finally:
        if saved is None:
            del os.environ[KERNELS_ENV]
        else:
            os.environ[KERNELS_ENV] = saved


def _relative(got: Tensor, ref: Tensor) -> float:
    """The largest error of a row relative to the row's largest reference entry; a 1-D
    tensor (per-token values) has one entry per row."""
    got, ref = (x.double().reshape(-1, ref.shape[-1] if ref.dim() > 1 else 1) for x in (got, ref))
    scale = ref.abs().amax(-1).clamp_min(1e-300)
    return ((got - ref).abs().amax(-1) / scale).max().item()


def _compare(name: str, fn: Callable, tolerances: dict[str, float], device, repeats) -> Check:
    """The Triton kernels against the chunked twins on the same inputs; fn returns one tensor
    per tolerance on the largest relative error (0: bit-identical)."""
    with _kernels("triton"):
        kernel, kernel_ms = timed(fn, device, repeats)
    with _kernels("chunked"):
        twin, twin_ms = timed(fn, device, repeats)
    errors = [_relative(a, b) for a, b in zip(kernel, twin, strict=True)]
    ok = all(e <= tolerance for e, tolerance in zip(errors, tolerances.values(), strict=True))
    figures = ", ".join(
        f"{label} {e:.1e}" if tolerance else f"{label} {'bit-identical' if e == 0 else 'DIFFERS'}"
        for e, (label, tolerance) in zip(errors, tolerances.items(), strict=True)
    )
    detail = f"{figures}; triton {kernel_ms:.2f} ms, chunked {twin_ms:.2f} ms"
    return Check(name, PASS if ok else FAIL, detail)


def check_kernels(runtime: Runtime) -> list[Check]:
    """Every Triton kernel against its twin: the fused head with the cross-entropy and Duo
    losses forward and backward in float32 and bf16, and the noising of MDLM, Duo and GIDD. A
    broken kernel is off by O(1); the tolerances leave room for float32 in another summation
    order: values 1e-5 (the tests' bound against float64); float32 gradients 1e-3, as Duo's
    near t = 1e-3 is a difference of terms near r p >> 1 (each backend is within 1e-4 of
    float64 at V = 32001); bf16 gradients 5e-2: each backend's float32 logit gradient is
    rounded to bf16 (one ulp is 2^-8) and summed by the head's bf16 matmuls, where entries
    rounded the other way add up in rows whose sum cancels (seen up to 1.5e-2 on CPU)."""
    device = runtime.device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return [Check("kernels", SKIP, "CPU without TRITON_INTERPRET=1 (set it before starting)")]
    tokens, v, noise_shape, repeats = KERNEL_SIZES[device.type]
    vocab = Vocab.build(v, mask_id=4, never_in_data=(3, v - 1)).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    checks = []
    for dtype, grad_tolerance in ((torch.float32, 1e-3), (torch.bfloat16, 5e-2)):
        hidden = torch.randn(tokens // 8, 8, HEAD_DIM[device.type], generator=g, device=device)
        for name in ("cross-entropy", "duo"):
            label = f"kernel head+{name} {str(dtype).removeprefix('torch.')}"
            fn = _loss_and_grad(name, hidden.to(dtype), vocab, g)
            tolerances = {"loss err": 1e-5, "hidden grad err": grad_tolerance}
            tolerances["weight grad err"] = grad_tolerance
            checks.append(attempt(label, partial(_compare, label, fn, tolerances, device, repeats)))
    for name, objective in (("mdlm", MDLM()), ("duo", Duo()), ("gidd", GIDD(p_uniform=0.3))):
        x0 = _real_ids(vocab, noise_shape, g)
        t = torch.rand(len(x0), generator=g, device=device) * 0.998 + 1e-3
        ids = torch.randint(2**40, (len(x0),), generator=g, device=device)
        fn = partial(_noise, objective, x0, t, ids, vocab)
        label = f"kernel noise {name}"
        checks.append(attempt(label, partial(_compare, label, fn, {"xt": 0}, device, repeats)))
    return checks


def _real_ids(vocab: Vocab, shape, g: torch.Generator) -> Tensor:
    return vocab.real_ids[torch.randint(vocab.num_real, shape, generator=g, device=g.device)]


def _loss_and_grad(name: str, hidden: Tensor, vocab: Vocab, g: torch.Generator) -> Callable:
    """A head drawn once (hidden [l, 8, d] in its dtype, weight [V, d], bias [V]) with labels
    (t from 1e-3 to 1, xt == x0 for half the tokens); each call: the fused head+loss's
    per-token losses and the gradients of the training loss (the token mean) with respect to
    the hidden states and the weight. `name`: "cross-entropy" (AR) or "duo"."""
    device, (length, rows, d) = g.device, hidden.shape
    objective = AR() if name == "cross-entropy" else Duo()
    weight = torch.randn(vocab.size, d, generator=g, device=device) / d**0.5
    bias = torch.randn(vocab.size, generator=g, device=device)
    x0, others = _real_ids(vocab, (rows, length), g), _real_ids(vocab, (rows, length), g)
    xt = torch.where(torch.rand(rows, length, generator=g, device=device) < 0.5, others, x0)
    t = torch.rand(rows, generator=g, device=device) * 0.998 + 1e-3
    labels = (x0, x0 if name == "cross-entropy" else xt, t)

    def call() -> tuple[Tensor, Tensor, Tensor]:
        leaves = [x.detach().requires_grad_() for x in (hidden, weight, bias)]
        head = HeadInput(*leaves, None)
        losses = objective.per_token_loss(head, *labels, vocab)
        objective.train_loss(head, *labels, vocab).backward()
        return losses, leaves[0].grad, leaves[1].grad

    return call


def _noise(objective: Objective, x0: Tensor, t: Tensor, ids: Tensor, vocab: Vocab) -> tuple[Tensor]:
    """xt of MDLM (mask), Duo (uniform ids) or GIDD (both). x0 [B, L]; t, ids [B] -> ([B, L],)"""
    return (objective.noise(x0, t, ids, vocab),)
