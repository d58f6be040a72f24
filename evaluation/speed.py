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
from dlm_pretrain.pretrain.sampling import Sampler
from dlm_pretrain.pretrain.trained_model import TrainedModel, sampler_of, untrained_like


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


def timed_sampling(sampler: Sampler, sampling: SamplingConfig) -> tuple[float, int]:
    """Seconds and forward passes of one `generate` call, synchronised with the device."""
    _synchronize(sampler.device)
    start = time.perf_counter()
    samples = sampler.draw(sampling)
    _synchronize(sampler.device)
    return time.perf_counter() - start, samples.forward_passes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sampling_speed(
    sampler: Sampler, steps: list[int], batches: list[int], name: str, repeats: int = 3
) -> list[SpeedPoint]:
    """The median of `repeats` timed calls per (steps, batch), each batch size warmed up
    once; AR's steps are its length."""
    settings = [sampler.seq_len - 1] if isinstance(sampler.objective, AR) else steps
    kind = type(sampler.objective).__name__
    points = []
    for batch in batches:
        timed_sampling(sampler, SamplingConfig(steps=min(settings), num_samples=batch))
        for count in settings:
            sampling = SamplingConfig(steps=count, num_samples=batch)
            runs = sorted(timed_sampling(sampler, sampling) for _ in range(repeats))
            seconds, passes = runs[len(runs) // 2]
            points.append(SpeedPoint(name, kind, count, batch, sampler.seq_len, seconds, passes))
    return points


def ar_baseline(model: TrainedModel, batches: list[int], repeats: int = 3) -> list[SpeedPoint]:
    """AR with its cache on the target's backbone (the target itself if it is AR)."""
    ar = model if isinstance(model.objective, AR) else untrained_like(model, AR())
    name = f"AR baseline ({model.cfg.model.size})"
    return sampling_speed(sampler_of(ar, SamplingConfig()), [], batches, name, repeats)
