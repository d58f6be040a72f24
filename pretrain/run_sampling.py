"""Samples from the latest checkpoint of a run directory (`dlm sample RUN_DIR`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dlm_pretrain.pretrain.config import SamplingConfig
from dlm_pretrain.pretrain.trained_model import load_trained_model, sampler_of


@dataclass(frozen=True)
class RunSamples:
    texts: list[str]
    step: int
    tokens_per_s: float
    forward_passes: int


def sample_run(run_dir: str | Path, sampling: SamplingConfig) -> RunSamples:
    model = load_trained_model(run_dir)  # one process, any saved layout
    tokenizer = model.tokenizer
    start = time.perf_counter()
    samples = sampler_of(model, sampling).draw(sampling)
    seconds = time.perf_counter() - start
    return RunSamples(
        [tokenizer.decode(row.tolist()) for row in samples.tokens],
        model.step,
        samples.tokens.numel() / seconds,
        samples.forward_passes,
    )
