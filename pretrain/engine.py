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

# (first step, total steps) of each revision of the run (pretrain/revisions.py), oldest first.
Schedule = list[tuple[int, int]]


def lr_multiplier(step: int, schedule: Schedule, optim: OptimConfig) -> float:
    """lr(s)/lr: (s+1)/W during warmup (W from the first total), then cosine down to min_lr
    at the total (docs/algorithms.md §6.3). A restart that changes the total at step c > W
    bends the decay there: from its value at c, a new cosine down to min_lr at the new
    total, so the learning rate never jumps; before W the warmup stays and the cosine runs
    to the new total. Revisions that keep the total change nothing."""
    warmup = _warmup_steps(schedule, optim)
    if step < warmup:
        return (step + 1) / warmup
    floor = optim.min_lr / optim.lr
    start, value, end = warmup, 1.0, schedule[0][1]
    for first, total in schedule:
        if first > step:
            break
        if total != end and first > start:  # the decay so far, bent at `first`
            start, value = first, _cosine(first, start, value, end, floor)
        end = total
    return _cosine(step, start, value, end, floor)


def _warmup_steps(schedule: Schedule, optim: OptimConfig) -> int:
    """W: a share of the first total, at least optim.min_warmup_steps."""
    return max(int(optim.warmup_fraction * schedule[0][1]), optim.min_warmup_steps)


def _cosine(step: int, start: int, value: float, end: int, floor: float) -> float:
    """From `value` at `start` down to `floor` at `end`, half a cosine period."""
    progress = min(1.0, (step - start) / max(1, end - start))
    return floor + (value - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def describe_schedule(schedule: Schedule, optim: OptimConfig, step: int) -> str:
    """What the learning rate does from `step` on, for the log of a restart."""
    warmup = _warmup_steps(schedule, optim)
    end = schedule[-1][1]
    now = optim.lr * lr_multiplier(step, schedule, optim)
    ramp = f"warms up to {optim.lr:.3g} at step {warmup}, then " if step < warmup else ""
    if now <= optim.min_lr:
        return f"the learning rate stays at optim.min_lr={optim.min_lr:.3g} to step {end}"
    return (
        f"the learning rate is {now:.3g} at step {step}; it {ramp}follows a cosine down to "
        f"optim.min_lr={optim.min_lr:.3g} at step {end}, without a jump"
    )


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


def apply_optim(engine, optim: OptimConfig) -> None:
    """After a checkpoint load, the hyper-parameters of `optim` rather than the saved ones:
    DeepSpeed restores the param groups (lr, betas, eps, weight decay), the scheduler's base
    rate and the clipping from the checkpoint, which would silently undo a change that
    train.allow_changes let through. Unchanged values are set to what they were."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [optim.lr] * len(scheduler.base_lrs)
    rates = [
        lr * f(scheduler.last_epoch)
        for lr, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group.update(
            lr=rate,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
    engine.optimizer.clip_grad = optim.grad_clip  # the ZeRO optimizer clips


def build_engine(
    model: torch.nn.Module,
    train: TrainConfig,
    optim: OptimConfig,
    groups: ProcessGroups,
    schedule: Schedule,
    load_universal: bool = False,
):
    """A DeepSpeed PipelineEngine over the model, with weight decay on every parameter
    (docs/pitfalls.md P12) and the learning rate of `schedule`. `load_universal`: the
    checkpoint to resume from is in DeepSpeed's universal format."""
    config = deepspeed_config(train, optim, groups.dp_size, load_universal)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=config,
        lr_scheduler=lambda opt: LambdaLR(opt, lambda s: lr_multiplier(s, schedule, optim)),
    )
    return engine
