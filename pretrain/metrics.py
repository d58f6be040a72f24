"""The step line (torchtitan / Megatron style) and model FLOPs utilisation."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def device_peak_flops(configured: float) -> float:
    """The configured figure, the datasheet peak of a known GPU, or a measured CPU matmul rate."""
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, flops in PEAK_BF16_FLOPS.items():
            if key in name:
                return flops
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * n**3 / (time.perf_counter() - start)


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float
    flops_per_s_per_device: float
    mfu: float  # model FLOPs utilisation: achieved / peak FLOP/s per device


def throughput(
    sequences: float,
    seconds: float,
    seq_len: int,
    flops_per_sequence: float,
    devices: int,
    peak_flops: float,
) -> Throughput:
    """Training speed of `sequences` in `seconds` over `devices` (the step line's and the
    smoke check's figures, one definition)."""
    sequences_per_s = sequences / seconds
    per_device = sequences_per_s * flops_per_sequence / devices
    return Throughput(sequences_per_s * seq_len, per_device, per_device / peak_flops)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def step_line(
    *,
    step: int,
    total: int,
    tokens: int,
    flops: float,
    loss: float,
    lr: float,
    grad_norm: float,
    tokens_per_s: float,
    flops_per_s_per_device: float,
    mfu: float,
    elapsed_s: float,
) -> str:
    eta = elapsed_s / max(step, 1) * (total - step)
    return (
        f"step {step:>6}/{total} | tokens {tokens / 1e6:8.2f}M | FLOPs {flops:.3e} | "
        f"loss {loss:7.4f} | lr {lr:.2e} | "
        f"grad {grad_norm:6.3f} | {tokens_per_s:8.0f} tok/s | "
        f"{flops_per_s_per_device / 1e12:6.3f} TFLOP/s/dev | MFU {100 * mfu:5.1f}% | "
        f"elapsed {_duration(elapsed_s)} | ETA {_duration(eta)}"
    )
