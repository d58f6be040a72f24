"""Sampling speed (docs/algorithms.md §8.4): wall-clock tokens/s and latency of the
objective's sampler per steps setting, at batch 1 and batch N, timed, not estimated.

The baseline is AR with its key/value cache on the same backbone, timed in the same process
(its weights are fresh: speed does not depend on them). Each batch size is warmed up once
(kernel compilation, allocator) before anything is timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from dlm_pretrain.pretrain.config import SamplingConfig
from dlm_pretrain.pretrain.objectives import AR
from dlm_pretrain.pretrain.sampling import generate
from dlm_pretrain.pretrain.trained_model import TrainedModel, untrained_like


@dataclass(frozen=True)
class SpeedPoint:
    target: str
    objective: str
    steps: int  # the sampler's steps setting (AR: seq_len - 1 decoding steps)
    batch: int
    seq_len: int
    seconds: float  # one call: the latency of every sequence in the batch
    forward_passes: int

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.seq_len / self.seconds


def timed_sampling(model: TrainedModel, sampling: SamplingConfig) -> tuple[float, int]:
    """Seconds and forward passes of one `generate` call, synchronised with the device."""
    synchronize(model)
    start = time.perf_counter()
    samples = generate(
        model.objective,
        model.layers,
        model.vocab,
        sampling,
        model.seq_len,
        model.tokenizer.special.eos,
    )
    synchronize(model)
    return time.perf_counter() - start, samples.forward_passes


def synchronize(model: TrainedModel) -> None:
    if model.runtime.device.type == "cuda":
        torch.cuda.synchronize(model.runtime.device)


def sampling_speed(
    model: TrainedModel, steps: list[int], batches: list[int], name: str = "", repeats: int = 3
) -> list[SpeedPoint]:
    """The median of `repeats` timed calls per (steps, batch); AR's steps are its length."""
    settings = [model.seq_len - 1] if isinstance(model.objective, AR) else steps
    points = []
    for batch in batches:
        timed_sampling(model, SamplingConfig(steps=min(settings), num_samples=batch))  # warm-up
        for count in settings:
            sampling = SamplingConfig(steps=count, num_samples=batch)
            runs = sorted(timed_sampling(model, sampling) for _ in range(repeats))
            seconds, passes = runs[len(runs) // 2]
            kind = type(model.objective).__name__
            points.append(
                SpeedPoint(name or model.name, kind, count, batch, model.seq_len, seconds, passes)
            )
    return points


def ar_baseline(model: TrainedModel, batches: list[int], repeats: int = 3) -> list[SpeedPoint]:
    """AR with its cache on the target's backbone (the target itself if it is AR)."""
    ar = model if isinstance(model.objective, AR) else untrained_like(model, AR())
    name = f"AR baseline ({model.cfg.model.size})"
    return sampling_speed(ar, [], batches, name=name, repeats=repeats)
