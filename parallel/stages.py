"""A forward pass through every pipeline stage without gradients (validation).

Training runs DeepSpeed's 1F1B schedule; evaluation only needs each stage to run its layers
and hand the activations on. The tensors that flow between stages are the same in both:
(hidden [L, B, d], cond [B, c]) in the parameters' dtype, sent to the next stage of the
same (data, tensor) coordinate.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from dlm_pretrain.parallel.config import ModelConfig
from dlm_pretrain.parallel.groups import ProcessGroups
from torch import Tensor
from torch.nn import Module


def _neighbour(groups: ProcessGroups, offset: int) -> int:
    return dist.get_global_rank(groups.pp_group, groups.pp_rank + offset)


@torch.no_grad()
def forward_through_stages(
    module: Module, inputs: tuple[Tensor, Tensor], cfg: ModelConfig, groups: ProcessGroups
) -> Tensor | None:
    """inputs (tokens [B, L], s [B]) are used on the first stage; every stage needs them only
    for B and L. Returns this rank's logits shard [B, L, V/tp] on the last stage, else None."""
    tokens, _ = inputs
    if groups.pp_rank == 0:
        out = inputs
    else:
        like = next(module.parameters())  # activations have the parameters' dtype and device
        batch, length = tokens.shape
        out = (like.new_empty(length, batch, cfg.hidden_size), like.new_empty(batch, cfg.cond_dim))
        for tensor in out:
            dist.recv(tensor, src=_neighbour(groups, -1))
    for layer in module.forward_funcs:
        out = layer(out)
    if groups.pp_rank == groups.pp_size - 1:
        return out
    for tensor in out:
        dist.send(tensor.contiguous(), dst=_neighbour(groups, 1))
    return None
