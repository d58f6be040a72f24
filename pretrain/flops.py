"""FLOPs accounting for FLOP-matched training (docs/algorithms.md §6).

Two conventions:
- "exact": the forward FLOPs actually spent per sequence: the weight matmuls, the attention
  matmuls (QKᵀ and AV; half of them for causal attention), and the output head and the loss
  on the rows the loss reads (all but AR's last; MDLM's masked ones, half on average).
- "reference": the paper's figure (docs/algorithms.md §6.2): its measured per-size table where
  the run is the paper's shape (a size of the table, V = 32001, L = 2048), else its formula
  2 (12 n d² + d V) L: weight matmuls and the head, attention omitted, the same for every
  objective. Use it to reproduce the paper's step counts (docs/pitfalls.md P9: it undercounts
  by 15-49% at L = 2048).
Training FLOPs = 3 x forward (the backward counted as twice the forward). Both conventions
count the tokenizer's vocabulary, never the tensor-parallel padding, so a budget buys the same
steps in every parallel layout.
"""

from __future__ import annotations

from dlm_pretrain.parallel.config import TIME_FEATURES, ModelConfig
from dlm_pretrain.pretrain.objectives import OBJECTIVES

CONVENTIONS = ("exact", "reference")

# The paper's forward FLOPs of one sequence by size, as its profiler measured them for
# V = 32001 and L = 2048 (docs/algorithms.md §6.2); they give its step counts exactly.
REFERENCE_VOCAB, REFERENCE_SEQ_LEN = 32001, 2048
REFERENCE_FORWARD_FLOPS = {
    "6M": 53_026_000_000,
    "19M": 108_600_000_000,
    "34M": 170_570_000_000,
    "48M": 222_747_000_000,
    "66M": 285_808_000_000,
    "75M": 406_821_000_000,
    "85M": 346_382_000_000,
    "113M": 449_410_000_000,
    "142M": 536_595_000_000,
    "170M": 623_779_000_000,
    "180M": 671_042_000_000,
    "206M": 750_126_000_000,
    "231M": 829_211_000_000,
    "268M": 960_366_000_000,
    "302M": 1_063_600_000_000,
    "336M": 1_166_900_000_000,
    "472M": 1_618_700_000_000,
    "551M": 1_860_500_000_000,
    "571M": 1_940_000_000_000,
    "629M": 2_102_300_000_000,
    "666M": 2_232_600_000_000,
    "761M": 2_525_200_000_000,
    "831M": 2_754_500_000_000,
    "944M": 3_102_700_000_000,
    "1233M": 4_025_600_000_000,
    "1476M": 4_806_600_000_000,
    "1678M": 5_425_400_000_000,
    "2121M": 6_805_400_000_000,
}


def attention_flops_per_sequence(cfg: ModelConfig, seq_len: int, causal: bool) -> int:
    """QKᵀ and AV: 4 L² d per block; a causal model needs half of the score matrix."""
    full = 4 * seq_len**2 * cfg.hidden_size * cfg.n_layers
    return full // 2 if causal else full


def conditioning_flops_per_sequence(cfg: ModelConfig) -> int:
    """The time embedding MLP and every adaLN modulation, once per sequence."""
    c, d = cfg.cond_dim, cfg.hidden_size
    return 2 * (TIME_FEATURES * c + c * c) + 2 * c * 6 * d * cfg.n_layers + 2 * c * 2 * d


def forward_flops_per_sequence(
    cfg: ModelConfig,
    objective: str,
    seq_len: int,
    convention: str = "exact",
    size: str = "",
    sequential_share: float = 0.0,
    scored_share: float | None = None,
) -> int:
    """Forward FLOPs of one sequence of `seq_len` tokens under the given convention; `size`, the
    preset's name, picks the paper's measured figure where the run has the paper's shape;
    `sequential_share`, Eso-LM's share of rows in the sequential branch (their blocks run 2L
    tokens), and `scored_share`, the expected share of positions the head and the loss run on
    (Objective.scored_share; None: the objective's defaults'), both under `exact` only."""
    if convention == "reference":
        paper_shape = (cfg.vocab_size, seq_len) == (REFERENCE_VOCAB, REFERENCE_SEQ_LEN)
        if paper_shape and size in REFERENCE_FORWARD_FLOPS:
            return REFERENCE_FORWARD_FLOPS[size]
        per_token = 2 * (12 * cfg.n_layers * cfg.hidden_size**2 + cfg.hidden_size * cfg.vocab_size)
        return per_token * seq_len
    if convention != "exact":
        raise ValueError(f"unknown FLOPs convention {convention!r}; use one of {CONVENTIONS}")
    spec = OBJECTIVES[objective]  # its class: causality and the loss's FLOPs per entry
    if scored_share is None:
        scored_share = spec().scored_share(seq_len)
    scored = scored_share * seq_len  # the head's and the loss's rows (pretrain.kernels.losses)
    head = (2 * cfg.hidden_size + spec.loss_flops_per_vocab_entry) * cfg.vocab_size * scored
    causal = attention_flops_per_sequence(cfg, seq_len, spec.causal)
    blocks = 24 * cfg.n_layers * cfg.hidden_size**2 * seq_len
    one_pass = blocks + head + causal + conditioning_flops_per_sequence(cfg)
    # [z_0 ; x]: the x-half adds its blocks (not the head) and its conditioning; the scores
    # needed grow from one causal L x L to two half matrices (x causal, z over x's earlier
    # slots and itself)
    x_half = blocks + conditioning_flops_per_sequence(cfg)
    pair = one_pass + x_half + attention_flops_per_sequence(cfg, seq_len, causal=False) - causal
    return round((1 - sequential_share) * one_pass + sequential_share * pair)


def training_flops_per_sequence(
    cfg: ModelConfig,
    objective: str,
    seq_len: int,
    convention: str = "exact",
    size: str = "",
    sequential_share: float = 0.0,
    scored_share: float | None = None,
) -> int:
    return 3 * forward_flops_per_sequence(
        cfg, objective, seq_len, convention, size, sequential_share, scored_share
    )


def steps_for_budget(budget_flops: float, train_flops_per_sequence: int, global_batch: int) -> int:
    """steps = budget / (training FLOPs per sequence x global batch), rounded down
    (docs/algorithms.md §6.1)."""
    return int(budget_flops / (train_flops_per_sequence * global_batch))
