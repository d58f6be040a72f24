"""Model and parallel-layout configuration, and the size presets of docs/algorithms.md §5.7."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dlm_pretrain.common.config import Section
from dlm_pretrain.common.errors import ConfigError
from pydantic import Field

COND_DIM = 128  # every size of the paper conditions adaLN through a 128-wide time embedding
TIME_FEATURES = 256  # sinusoidal features of the scalar s (128 frequencies x cos, sin)
# The axis each tensor-parallel parameter is split along (megatron's partition_dim), by name
# inside its layer; every other parameter is replicated over the tensor group. Checkpoint
# tools join and re-cut shards with it, without building the model.
TENSOR_SPLIT_DIMS = {
    "embedding.weight": 0,
    "qkv.weight": 0,
    "fc1.weight": 0,
    "fc1.bias": 0,
    "attn_out.weight": 1,
    "fc2.weight": 1,
    "head.weight": 0,
    "head.bias": 0,
}

# name -> (hidden size d, blocks, heads): the paper's FLOPs sweep (docs/algorithms.md §5.7), then
# small CPU presets.
SIZES: dict[str, tuple[int, int, int]] = {
    "6M": (256, 6, 4),
    "19M": (384, 8, 6),
    "34M": (512, 8, 8),
    "48M": (576, 9, 9),
    "66M": (640, 10, 10),
    "75M": (640, 16, 8),
    "85M": (640, 13, 10),
    "113M": (768, 12, 12),
    "142M": (768, 15, 12),
    "170M": (768, 18, 12),
    "180M": (896, 14, 14),
    "206M": (896, 16, 14),
    "231M": (896, 18, 14),
    "268M": (1024, 16, 16),
    "302M": (1024, 18, 16),
    "336M": (1024, 20, 16),
    "472M": (1280, 18, 10),
    "551M": (1280, 21, 10),
    "571M": (1408, 18, 11),
    "629M": (1280, 24, 10),
    "666M": (1408, 21, 11),
    "717M": (1536, 19, 12),
    "761M": (1408, 24, 11),
    "831M": (1536, 22, 12),
    "944M": (1536, 25, 12),
    "1028M": (1792, 20, 14),
    "1233M": (1792, 24, 14),
    "1476M": (2048, 22, 16),
    "1678M": (2048, 25, 16),
    "2121M": (2176, 28, 17),
    # CPU presets: quick tests, laptop runs and the mini study (sweeps/mini.yaml)
    "micro": (32, 2, 2),
    "tiny": (64, 2, 2),
    "cpu-96": (96, 3, 3),
    "cpu-small": (128, 4, 4),
    "cpu-base": (256, 4, 4),
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The DDiT backbone (docs/algorithms.md §5)."""

    hidden_size: int = field(metadata={"help": "d, the residual width"})
    n_layers: int = field(metadata={"help": "number of transformer blocks"})
    n_heads: int = field(metadata={"help": "attention heads; d_head = d / n_heads"})
    vocab_size: int = field(
        metadata={"help": "V, rows of the embedding and logits (mask included)"}
    )
    seq_len: int = field(metadata={"help": "L, the longest sequence (rotary table size)"})
    cond_dim: int = field(default=COND_DIM, metadata={"help": "width of the time conditioning"})
    dropout: float = field(default=0.0, metadata={"help": "residual-branch dropout (paper: 0)"})
    rotary_base: float = field(default=10_000.0, metadata={"help": "rotary frequency base"})
    init_seed: int = field(default=0, metadata={"help": "parameters are a function of this"})

    def __post_init__(self) -> None:
        if self.hidden_size % self.n_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.n_heads="
                f"{self.n_heads}; choose n_heads in {_divisors(self.hidden_size)}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head size {self.head_dim} must be even for rotary embeddings")
        if min(self.n_layers, self.vocab_size, self.seq_len) < 1 or not 0 <= self.dropout < 1:
            raise ConfigError(f"model config out of range: {self}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @classmethod
    def preset(cls, name: str, *, vocab_size: int, seq_len: int, **overrides) -> ModelConfig:
        if name not in SIZES:
            raise ConfigError(f"unknown model size {name!r}; choose one of {', '.join(SIZES)}")
        d, layers, heads = SIZES[name]
        return cls(
            hidden_size=d,
            n_layers=layers,
            n_heads=heads,
            vocab_size=vocab_size,
            seq_len=seq_len,
            **overrides,
        )


ATTENTION_KINDS = ("bidirectional", "causal", "sorted")


@dataclass(frozen=True)
class AttentionSpec:
    """The backbone's attention pattern, fixed for a run (docs/algorithms.md §5.2, §5.6).

    "sorted" is Eso-LM's: tokens arrive permuted with their original positions (int64 members
    of the stage tuple, one [rows, L] tensor per row kind present, diffusion rows first).
    Diffusion rows attend causally over their slots; sequential rows come as two column
    groups [z-halves | x-halves] with §5.6's pair mask. Which kinds are present is static, so
    no stage ever carries an empty tensor."""

    kind: Literal["bidirectional", "causal", "sorted"]
    diffusion_rows: bool = False
    sequential_rows: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise ConfigError(f"attention kind {self.kind!r}; choose one of {ATTENTION_KINDS}")
        if (self.kind == "sorted") != (self.diffusion_rows or self.sequential_rows):
            raise ConfigError(
                f"{self}: row kinds are for sorted attention only, and sorted attention needs "
                "diffusion_rows, sequential_rows or both"
            )


def parameter_count(cfg: ModelConfig) -> int:
    """Exact parameter count of the DDiT (docs/algorithms.md §5.7).

    per block: 12d² + 7d + 6(c+1)d; plus embedding V·d, time embedding, final LN d, output head
    V·d + V and final adaLN 2cd + 2d.
    """
    d, c, v = cfg.hidden_size, cfg.cond_dim, cfg.vocab_size
    block = 12 * d * d + 7 * d + 6 * (c + 1) * d
    time_embedding = TIME_FEATURES * c + c + c * c + c
    return cfg.n_layers * block + v * d + time_embedding + d + v * d + v + 2 * c * d + 2 * d


class ParallelConfig(Section):
    """The parallel layout; data parallel = world / (tensor x pipeline)."""

    tensor: int = Field(default=1, ge=1, description="tensor-parallel size")
    pipeline: int = Field(default=1, ge=1, description="pipeline-parallel size")
    # DeepSpeed PipelineModule's partition methods
    partition: Literal["parameters", "uniform"] = Field(
        default="parameters",
        description="pipeline stages balanced by parameter count, or uniform by layers",
    )

    def data_parallel_size(self, world_size: int) -> int:
        """world / (tensor x pipeline); the world must split evenly."""
        model_parallel = self.tensor * self.pipeline
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor={self.tensor} x "
                f"parallel.pipeline={self.pipeline}; launch a multiple of {model_parallel} "
                "processes"
            )
        return world_size // model_parallel


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]
