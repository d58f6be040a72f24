"""A straightforward single-process PyTorch DiT: what bench/model.py times ours against.

The shapes of parallel/model.py (docs/algorithms.md §5: embedding, time MLP, pre-LN blocks
with adaLN modulation, rotary attention, GELU MLP, adaLN output layer and an untied head),
written plainly, batch-first, with every position's logits [B, L, V] computed and the loss
taken over them as the reference code does (bench/loss.py's formulations).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from dlm_pretrain.parallel.config import TIME_FEATURES, ModelConfig
from torch import Tensor, nn


def _layer_norm(x: Tensor, weight: Tensor) -> Tensor:
    return F.layer_norm(x, weight.shape, weight, None, 1e-5)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on the two halves of the head dimension. x [B, H, L, dh]"""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, d: int, heads: int, cond_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.modulation = nn.Linear(cond_dim, 6 * d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor, cond: Tensor, cos: Tensor, sin: Tensor, causal: bool) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, -1)
        h = _layer_norm(x, self.norm1) * (1 + scale1) + shift1
        batch, length, d = h.shape
        q, k, v = self.qkv(h).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + gate1 * self.attn_out(a.transpose(1, 2).reshape(batch, length, d))
        h = _layer_norm(x, self.norm2) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class BaselineDiT(nn.Module):
    """(tokens [B, L], s [B]) -> logits [B, L, V] float32."""

    def __init__(self, cfg: ModelConfig, causal: bool = False) -> None:
        super().__init__()
        d, c = cfg.hidden_size, cfg.cond_dim
        self.causal = causal
        self.embedding = nn.Embedding(cfg.vocab_size, d)
        half = TIME_FEATURES // 2
        self.register_buffer("freqs", torch.exp(-math.log(1e4) * torch.arange(half) / half))
        self.time_fc1, self.time_fc2 = nn.Linear(TIME_FEATURES, c), nn.Linear(c, c)
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, c) for _ in range(cfg.n_layers))
        self.norm = nn.Parameter(torch.ones(d))
        self.modulation = nn.Linear(c, 2 * d)
        self.head = nn.Linear(d, cfg.vocab_size)
        dh = cfg.head_dim
        inverse = 1.0 / cfg.rotary_base ** (torch.arange(0, dh, 2) / dh)
        angles = torch.outer(torch.arange(cfg.seq_len).float(), inverse).repeat(1, 2)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, tokens: Tensor, s: Tensor) -> Tensor:
        angles = s[:, None] * self.freqs[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        cond = F.silu(self.time_fc2(F.silu(self.time_fc1(features))))
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x, cond, self.cos, self.sin, self.causal)
        shift, scale = self.modulation(cond)[:, None].chunk(2, -1)
        return self.head(_layer_norm(x, self.norm) * (1 + scale) + shift)
