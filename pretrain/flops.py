"""FLOPs accounting for FLOP-matched training (docs/algorithms.md §6).

Two conventions:
- "exact": the forward FLOPs actually spent per sequence: the weight matmuls, the attention
  matmuls (QKᵀ and AV; half of them for causal attention), the output head and the loss.
- "reference": the paper's figure (docs/algorithms.md §6.2), 2 (12 n d² + d V) L: weight
  matmuls and the head, attention omitted, the same for every objective. Use it to reproduce
  the paper's step counts (docs/pitfalls.md P9: it undercounts by 15-49% at L = 2048).
Training FLOPs = 3 x forward (the backward counted as twice the forward).
"""

from __future__ import annotations

from dlm_pretrain.parallel.config import TIME_FEATURES, ModelConfig
from dlm_pretrain.pretrain.objectives import OBJECTIVES

CONVENTIONS = ("exact", "reference")


def matmul_flops_per_token(cfg: ModelConfig) -> int:
    """Weight-matmul FLOPs per token: 24 d² per block (qkv 6, out 2, MLP 16) and the head 2 d V."""
    return 24 * cfg.n_layers * cfg.hidden_size**2 + 2 * cfg.hidden_size * cfg.vocab_size


def attention_flops_per_sequence(cfg: ModelConfig, seq_len: int, causal: bool) -> int:
    """QKᵀ and AV: 4 L² d per block; a causal model needs half of the score matrix."""
    full = 4 * seq_len**2 * cfg.hidden_size * cfg.n_layers
    return full // 2 if causal else full


def conditioning_flops_per_sequence(cfg: ModelConfig) -> int:
    """The time embedding MLP and every adaLN modulation, once per sequence."""
    c, d = cfg.cond_dim, cfg.hidden_size
    return 2 * (TIME_FEATURES * c + c * c) + 2 * c * 6 * d * cfg.n_layers + 2 * c * 2 * d


def forward_flops_per_sequence(
    cfg: ModelConfig, objective: str, seq_len: int, convention: str = "exact"
) -> int:
    """Forward FLOPs of one sequence of `seq_len` tokens under the given convention."""
    if convention == "reference":
        per_token = 2 * (12 * cfg.n_layers * cfg.hidden_size**2 + cfg.hidden_size * cfg.vocab_size)
        return per_token * seq_len
    if convention != "exact":
        raise ValueError(f"unknown FLOPs convention {convention!r}; use one of {CONVENTIONS}")
    spec = OBJECTIVES[objective]  # its class: causality and the loss's FLOPs per entry
    loss = spec.loss_flops_per_vocab_entry * cfg.vocab_size * seq_len
    return (
        matmul_flops_per_token(cfg) * seq_len
        + attention_flops_per_sequence(cfg, seq_len, spec.causal)
        + conditioning_flops_per_sequence(cfg)
        + loss
    )


def training_flops_per_sequence(
    cfg: ModelConfig, objective: str, seq_len: int, convention: str = "exact"
) -> int:
    return 3 * forward_flops_per_sequence(cfg, objective, seq_len, convention)


def steps_for_budget(budget_flops: float, train_flops_per_sequence: int, global_batch: int) -> int:
    """steps = budget / (training FLOPs per sequence x global batch), rounded down
    (docs/algorithms.md §6.1)."""
    return int(budget_flops / (train_flops_per_sequence * global_batch))
