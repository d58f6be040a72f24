"""A forward pass through every pipeline stage without gradients (validation).

Training runs DeepSpeed's 1F1B schedule; evaluation only needs each stage to run its layers
and hand the activations on. The tensors that flow between stages are the same in both:
(hidden [L, B, d], cond [B, c]) in the parameters' dtype, then sorted attention's int64
positions (parallel.model.build_pipeline), sent to the next stage of the same (data, tensor)
coordinate.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from dlm_pretrain.parallel.config import ModelConfig
from dlm_pretrain.parallel.groups import ProcessGroups
from dlm_pretrain.parallel.head import HeadInput
from torch import Tensor
from torch.nn import Module


def _neighbour(groups: ProcessGroups, offset: int) -> int:
    return dist.get_global_rank(groups.pp_group, groups.pp_rank + offset)


@torch.no_grad()
def forward_through_stages(
    module: Module, inputs: tuple[Tensor, ...], cfg: ModelConfig, groups: ProcessGroups
) -> HeadInput | None:
    """inputs (tokens [B, L], s [B], *positions int64) are used on the first stage; every
    other stage shapes its receive buffers from them. Returns the head's input on the last
    stage (its vocabulary shard of the head), else None."""
    out = inputs if groups.pp_rank == 0 else _received(module, inputs, cfg, groups)
    for layer in module.forward_funcs:
        out = layer(out)
    if groups.pp_rank == groups.pp_size - 1:
        return out
    for tensor in out:
        dist.send(tensor.contiguous(), dst=_neighbour(groups, 1))
    return None


def _received(
    module: Module, inputs: tuple[Tensor, ...], cfg: ModelConfig, groups: ProcessGroups
) -> tuple[Tensor, ...]:
    """The previous stage's (hidden [L, B, d], cond [B, c], *positions), in the shapes this
    stage's own inputs imply."""
    tokens, _, *positions = inputs
    like = next(module.parameters())  # activations have the parameters' dtype and device
    batch, length = tokens.shape
    hidden = like.new_empty(length, batch, cfg.hidden_size)
    cond = like.new_empty(batch, cfg.cond_dim)
    out = (hidden, cond, *(p.new_empty(p.shape, device=like.device) for p in positions))
    for tensor in out:
        dist.recv(tensor, src=_neighbour(groups, -1))
    return out
