"""The DDiT backbone (docs/algorithms.md §5) from megatron-core tensor-parallel layers.

Shapes: tokens [B, L]; hidden [L, B, d] (megatron's sequence-first layout); cond [B, c];
the last stage gives the head's input (HeadInput), whose logits [B, L, V/tp] are split over
the vocabulary and computed by the losses only where they read them. Every module takes its
tensor-parallel group explicitly and has no tp-specific branch. Parameters are a function of
(init_seed, layer index) alone: each layer draws its initial values from its own generator,
and megatron's CPU initialisation builds the full weight before slicing it, so any layout
starts from the same model.

qkv rows are laid out [H, 3, d_head] (head-major, megatron's layout) so that a column split
gives each tensor-parallel rank whole heads; the reference's [3, H, d_head] is an export-time
permutation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule
from dlm_pretrain.parallel.attention import (
    KVCache,
    attend,
    attend_cached,
    rotary_tables,
    split_positions,
)
from dlm_pretrain.parallel.config import TIME_FEATURES, AttentionSpec, ModelConfig
from dlm_pretrain.parallel.groups import ProcessGroups
from dlm_pretrain.parallel.head import HeadInput
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import Tensor, nn
from torch.distributed import ProcessGroup

LN_EPS = 1e-5


class _AutocastLinear:
    """megatron's linear in the autocast dtype on any device: input, weight and bias are cast
    (differentiably, so gradients reach the float32 parameters in float32) before megatron's
    matmul. CUDA autocast would cast inside it, but megatron re-enters autocast for its
    backward on CUDA only; casting here gives CPU and GPU the same arithmetic
    (docs/algorithms.md §5.5)."""

    def _forward_impl(self, input, weight, *args, bias=None, **kwargs):
        if not torch.is_autocast_enabled(input.device.type):
            return super()._forward_impl(input, weight, *args, bias=bias, **kwargs)
        dtype = torch.get_autocast_dtype(input.device.type)
        bias = None if bias is None else bias.to(dtype)
        return super()._forward_impl(input.to(dtype), weight.to(dtype), *args, bias=bias, **kwargs)


class ColumnParallelLinear(_AutocastLinear, tensor_parallel.ColumnParallelLinear):
    pass


class RowParallelLinear(_AutocastLinear, tensor_parallel.RowParallelLinear):
    pass


def _megatron_config(tp_group: ProcessGroup) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_group.size(),
        use_cpu_initialization=True,  # full weight first, then the local slice
        params_dtype=torch.float32,
    )


def _uniform(bound: float, generator: torch.Generator) -> Callable[[Tensor], Tensor]:
    return lambda w: nn.init.uniform_(w, -bound, bound, generator=generator)


def _zeros(w: Tensor) -> Tensor:
    return nn.init.zeros_(w)


def _generator(cfg: ModelConfig, layer: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.init_seed * 1_000_003 + layer)


class LayerNorm(nn.Module):
    """Weight-only LayerNorm computed in float32 with autocast off (docs/algorithms.md §5.2).
    [..., d] -> f32"""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.weight.shape, self.weight.float(), None, LN_EPS)


class TimeEmbedding(nn.Module):
    """s -> SiLU(MLP([cos(s f_k), sin(s f_k)])), f_k = 10^(-4k/128) (docs/algorithms.md §5.1).
    s [B] -> [B, c]"""

    def __init__(self, cond_dim: int, generator: torch.Generator) -> None:
        super().__init__()
        half = TIME_FEATURES // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.fc1 = nn.Linear(TIME_FEATURES, cond_dim)
        self.fc2 = nn.Linear(cond_dim, cond_dim)
        for layer in (self.fc1, self.fc2):
            init = _uniform(1 / math.sqrt(layer.in_features), generator)
            init(layer.weight)
            init(layer.bias)

    def forward(self, s: Tensor) -> Tensor:
        angles = s.float()[:, None] * self.freqs[None]  # [B, 128]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        features = features.to(self.fc1.weight.dtype)
        return F.silu(self.fc2(F.silu(self.fc1(features))))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x [L, B, d] f32; shift, scale [B, d] f32 -> x (1 + scale) + shift, f32"""
    return x * (1 + scale[None]) + shift[None]


def _autocast(x: Tensor, dtype: torch.dtype) -> torch.autocast:
    """The low-precision region of docs/algorithms.md §5.5 (the blocks' matmuls, attention and the
    head) on x's device; float32 turns it off."""
    return torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)


class InputStage(nn.Module):
    """(tokens [B, L] int64, s [B] f32, *positions) -> (hidden [L, B, d] f32, cond [B, c] f32,
    *positions): sorted attention's int64 positions pass through every stage untouched."""

    def __init__(self, cfg: ModelConfig, tp_group: ProcessGroup) -> None:
        super().__init__()
        generator = _generator(cfg, 0)
        self.embedding = tensor_parallel.VocabParallelEmbedding(
            cfg.vocab_size,
            cfg.hidden_size,
            config=_megatron_config(tp_group),
            init_method=_uniform(1 / math.sqrt(cfg.hidden_size), generator),
            tp_group=tp_group,
        )
        self.time_embedding = TimeEmbedding(cfg.cond_dim, generator)

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        tokens, s, *positions = inputs
        hidden = self.embedding(tokens.t().contiguous())  # [L, B, d]
        return hidden, self.time_embedding(s), *positions


class DiTBlock(nn.Module):
    """Pre-LN transformer block with adaLN-Zero modulation (docs/algorithms.md §5.2).
    (hidden, cond, *positions) -> same"""

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        tp_group: ProcessGroup,
        attention: AttentionSpec,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        d, tp = cfg.hidden_size, tp_group.size()
        generator = _generator(cfg, layer)
        megatron = _megatron_config(tp_group)
        self.attention_spec, self.compute_dtype = attention, compute_dtype
        self.dropout = cfg.dropout
        self.heads_local, self.head_dim = cfg.n_heads // tp, cfg.head_dim
        self.norm1, self.norm2 = LayerNorm(d), LayerNorm(d)
        self.qkv = ColumnParallelLinear(
            d,
            3 * d,
            config=megatron,
            init_method=_uniform(1 / math.sqrt(d), generator),
            bias=False,
            gather_output=False,
            tp_group=tp_group,
        )
        self.attn_out = RowParallelLinear(
            d,
            d,
            config=megatron,
            init_method=_uniform(1 / math.sqrt(d), generator),
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )
        self.fc1 = ColumnParallelLinear(
            d,
            4 * d,
            config=megatron,
            init_method=_uniform(1 / math.sqrt(d), generator),
            bias=True,
            gather_output=False,
            tp_group=tp_group,
        )
        self.fc2 = RowParallelLinear(
            4 * d,
            d,
            config=megatron,
            init_method=_uniform(1 / math.sqrt(4 * d), generator),
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )
        self.modulation = nn.Linear(cfg.cond_dim, 6 * d)  # replicated on every tp rank
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        cos, sin = rotary_tables(cfg.seq_len, cfg.head_dim, cfg.rotary_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x, cond, *positions = inputs  # [L, B, d], [B, c], sorted attention's int64 [rows, L]
        spec = self.attention_spec
        full = partial(attend, cos=self.cos, sin=self.sin, attention=spec, positions=positions)
        return self._block(x, cond, full), cond, *positions

    def step(
        self,
        x: Tensor,
        cond: Tensor,
        cache: KVCache,
        positions: Tensor | None = None,
        keep: int | None = None,
    ) -> Tensor:
        """Incremental decoding of the next l tokens, as attend_cached describes.
        x [l, B, d] f32, positions [B, l] int64 or None -> [l, B, d] f32"""
        cached = partial(
            attend_cached, cos=self.cos, sin=self.sin, cache=cache, positions=positions, keep=keep
        )
        return self._block(x, cond, cached)

    def _block(self, x: Tensor, cond: Tensor, attend: Callable[..., Tensor]) -> Tensor:
        """x [l, B, d] f32 -> [l, B, d] f32, `attend` mapping q, k, v to the heads' outputs.
        The modulations, LayerNorms and the residual stream stay float32; the branches run
        in the compute dtype and promote back to float32 when the gates add them
        (docs/algorithms.md §5.5)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        with _autocast(x, self.compute_dtype):
            attention = self._attention(_modulate(self.norm1(x), shift1, scale1), attend)
        x = x + gate1[None] * F.dropout(attention, self.dropout, self.training)
        with _autocast(x, self.compute_dtype):
            hidden, _ = self.fc1(_modulate(self.norm2(x), shift2, scale2))
            mlp, _ = self.fc2(F.gelu(hidden, approximate="tanh"))
        return x + gate2[None] * F.dropout(mlp, self.dropout, self.training)

    def _attention(self, h: Tensor, attend: Callable[..., Tensor]) -> Tensor:
        """h [l, B, d] -> [l, B, d] (all-reduced over the tp group by attn_out)"""
        seq, batch = h.shape[:2]
        qkv, _ = self.qkv(h)  # [l, B, 3d/tp]
        qkv = qkv.view(seq, batch, self.heads_local, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].permute(1, 2, 0, 3) for i in range(3))  # [B, H/tp, l, dh]
        a = attend(q, k, v).permute(2, 0, 1, 3)
        out, _ = self.attn_out(a.reshape(seq, batch, self.heads_local * self.head_dim))
        return out


class OutputStage(nn.Module):
    """Final adaLN LayerNorm and the untied, zero-initialised head (docs/algorithms.md §5.4).

    (hidden [L, B, d] f32, cond [B, c] f32, *positions) -> HeadInput; with sorted attention's
    sequential rows, B excludes their x-half columns.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tp_group: ProcessGroup,
        attention: AttentionSpec,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.attention_spec, self.compute_dtype = attention, compute_dtype
        self.norm = LayerNorm(cfg.hidden_size)
        self.modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_size)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        self.head = ColumnParallelLinear(  # the parameters' container: the losses apply it
            cfg.hidden_size,
            cfg.vocab_size,
            config=_megatron_config(tp_group),
            init_method=_zeros,
            bias=True,
            gather_output=False,
            tp_group=tp_group,
        )
        self.tp_group = tp_group

    def forward(self, inputs: tuple[Tensor, ...]) -> HeadInput:
        x, cond, *positions = inputs
        _, pos_s = split_positions(self.attention_spec, positions)
        if pos_s is not None:  # the x-half columns were context for the z-halves, never scored
            scored = x.shape[1] - pos_s.shape[0]
            x, cond = x[:, :scored], cond[:scored]
        return self.head_input(x, cond)

    def head_input(self, x: Tensor, cond: Tensor) -> HeadInput:
        """x [l, B, d] f32, cond [B, c] -> the head's input [l, B, d] in the compute dtype."""
        shift, scale = self.modulation(cond).chunk(2, dim=-1)
        hidden = _modulate(self.norm(x), shift, scale).to(self.compute_dtype)
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
        return HeadInput(hidden, self.head.weight, self.head.bias, self.tp_group)

    @torch.no_grad()
    def full_logits(self, x: Tensor, cond: Tensor) -> Tensor:
        """The logits gathered over the tensor group, [B, l, V]: for sampling, never training."""
        logits = self.head_input(x, cond).logits().contiguous()
        if self.tp_group.size() == 1:
            return logits
        shards = [torch.empty_like(logits) for _ in range(self.tp_group.size())]
        dist.all_gather(shards, logits, group=self.tp_group)
        return torch.cat(shards, dim=-1)


def build_pipeline(
    cfg: ModelConfig,
    groups: ProcessGroups,
    attention: AttentionSpec,
    loss_fn: Callable | None = None,
    partition: str = "parameters",
    compute_dtype: torch.dtype = torch.float32,
) -> PipelineModule:
    """The model as DeepSpeed layer specs, cut into stages balanced by `partition`
    ("parameters" or "uniform" layers); each stage builds only its own layers. Between
    stages flows (hidden [L, B, d], cond [B, c]), float32, then for sorted attention its
    int64 positions (AttentionSpec), which need no gradient. Parameters are float32 whatever
    `compute_dtype`, the autocast dtype of the blocks' and the head's matmuls
    (docs/algorithms.md §5.5)."""
    tp_group = groups.tp_group
    blocks = [
        LayerSpec(DiTBlock, cfg, i + 1, tp_group, attention, compute_dtype)
        for i in range(cfg.n_layers)
    ]
    head = LayerSpec(OutputStage, cfg, tp_group, attention, compute_dtype)
    specs = [LayerSpec(InputStage, cfg, tp_group), *blocks, head]
    return PipelineModule(
        specs, topology=groups.topology, loss_fn=loss_fn, partition_method=partition
    )
