"""The DeepSpeed engine: ZeRO stage 1, AdamW, warmup-cosine schedule, clipping
(docs/algorithms.md §6.3).

DeepSpeed runs in float32: master parameters, gradients, their accumulation over micro-batches,
their all-reduce and the optimizer state. Low precision is the model's business (bf16
autocast inside the blocks and the head, parallel/model.py), as in the reference (docs/algorithms.md
§5.5); DeepSpeed's bf16 section would cast every parameter and the residual stream to bf16.
"""

from __future__ import annotations

import math

import deepspeed
import torch
from dlm_pretrain.parallel.groups import ProcessGroups
from dlm_pretrain.pretrain.config import OptimConfig, TrainConfig
from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(step: int, total_steps: int, optim: OptimConfig) -> float:
    """lr(s)/lr: (s+1)/W during warmup, then cosine down to min_lr (docs/algorithms.md §6.3)."""
    warmup = max(int(optim.warmup_fraction * total_steps), optim.min_warmup_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = optim.min_lr / optim.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(
    train: TrainConfig, optim: OptimConfig, dp_size: int, load_universal: bool
) -> dict:
    return {
        "checkpoint": {"load_universal": load_universal},
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.accumulation_steps(dp_size),
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": 1},  # the most DeepSpeed's pipeline engine allows
        # Stages exchange (hidden, cond) and both need gradients; DeepSpeed's activation
        # partitioning over the tensor group sends only the first tensor's gradient.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": [optim.beta1, optim.beta2],
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,  # no JIT-compiled kernel needed
            },
        },
        "steps_per_print": 10**9,  # our own log line reports progress
        "wall_clock_breakdown": False,
    }


def build_engine(
    model: torch.nn.Module,
    train: TrainConfig,
    optim: OptimConfig,
    groups: ProcessGroups,
    total_steps: int,
    load_universal: bool = False,
):
    """A DeepSpeed PipelineEngine over the model, with weight decay on every parameter
    (docs/pitfalls.md P12). `load_universal`: the checkpoint to resume from is in DeepSpeed's
    universal format."""
    config = deepspeed_config(train, optim, groups.dp_size, load_universal)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=config,
        lr_scheduler=lambda opt: LambdaLR(opt, lambda s: lr_multiplier(s, total_steps, optim)),
    )
    return engine
