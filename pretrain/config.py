"""The run configuration: one typed tree, loaded from a YAML preset plus `section.key=value`
overrides (STYLE.md §3-5). Unknown keys fail with the closest valid key; values are converted
to the annotated type or rejected."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.data_pipeline.config import DataConfig
from dlm_pretrain.parallel.config import SIZES, ParallelConfig
from dlm_pretrain.pretrain.objectives import OBJECTIVES
from dlm_pretrain.pretrain.objectives.mdlm import LOSS_TYPES

PRESETS = Path(__file__).parent / "presets"


@dataclass(frozen=True, kw_only=True)
class ModelSizeConfig:
    """The backbone; its vocabulary and sequence length come from the dataset's manifest."""

    size: str = field(default="cpu-small", metadata={"help": f"one of {', '.join(SIZES)}"})
    dropout: float = field(default=0.0, metadata={"help": "residual dropout"})
    init_seed: int = field(default=0, metadata={"help": "seed of the initial parameters"})

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ConfigError(f"model.size={self.size!r} is unknown; choose one of {list(SIZES)}")


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    name: str = field(default="mdlm", metadata={"help": "ar, mdlm or duo"})
    loss_type: str = field(
        default="cross_entropy", metadata={"help": "MDLM training loss: elbo or cross_entropy"}
    )
    seed: int = field(default=0, metadata={"help": "seed of t and of the corruption"})
    fused: bool = field(
        default=True, metadata={"help": "memory-lean loss kernels (false: plain PyTorch)"}
    )

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ConfigError(f"objective.name={self.name!r}; choose one of {list(OBJECTIVES)}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"objective.loss_type={self.loss_type!r}; choose one of {LOSS_TYPES}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay (ALGORITHMS.md §6.3)."""

    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=2e-5, metadata={"help": "learning rate at the end"})
    beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    beta2: float = field(default=0.95, metadata={"help": "Adam beta2"})
    eps: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    weight_decay: float = field(default=0.1, metadata={"help": "on all parameters (P12)"})
    warmup_fraction: float = field(default=0.01, metadata={"help": "warmup share of steps"})
    min_warmup_steps: int = field(default=100, metadata={"help": "warmup at least this long"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip"})


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    run_dir: str = field(default="runs/default", metadata={"help": "checkpoints, logs, samples"})
    global_batch: int = field(default=16, metadata={"help": "sequences per optimizer step"})
    micro_batch: int = field(default=8, metadata={"help": "sequences per forward per rank"})
    steps: int = field(default=0, metadata={"help": "optimizer steps (0: from flops_budget)"})
    flops_budget: float = field(default=0.0, metadata={"help": "training FLOPs; sets steps"})
    flops_convention: str = field(default="exact", metadata={"help": "exact or reference"})
    dtype: str = field(default="", metadata={"help": "float32 or bfloat16 (default: by device)"})
    log_every: int = field(default=10, metadata={"help": "steps between log lines"})
    val_every: int = field(default=100, metadata={"help": "steps between validations"})
    val_sequences: int = field(default=256, metadata={"help": "validation sequences (0: all)"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    max_bad_steps: int = field(default=5, metadata={"help": "non-finite steps in a row: stop"})
    sample_steps: int = field(default=64, metadata={"help": "denoising steps of the samples"})
    num_samples: int = field(default=2, metadata={"help": "samples written at each validation"})
    peak_flops: float = field(default=0.0, metadata={"help": "device peak for MFU (0: table)"})

    def __post_init__(self) -> None:
        if self.global_batch % self.micro_batch:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not divisible by train.micro_batch="
                f"{self.micro_batch}; use a micro_batch that divides it"
            )
        if (self.steps > 0) == (self.flops_budget > 0):
            raise ConfigError(
                f"set exactly one of train.steps ({self.steps}) and train.flops_budget "
                f"({self.flops_budget})"
            )

    def accumulation_steps(self, dp_size: int) -> int:
        """Micro-batches per rank per step; the global batch must split evenly."""
        per_step = self.micro_batch * dp_size
        if self.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not divisible by train.micro_batch="
                f"{self.micro_batch} x data-parallel size {dp_size}; choose a global batch that "
                f"is a multiple of {per_step}"
            )
        return self.global_batch // per_step


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    uri: str = field(default="", metadata={"help": "MLflow store (default: next to run_dir)"})
    experiment: str = field(default="dlm", metadata={"help": "MLflow experiment"})


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    steps: int = field(default=128, metadata={"help": "denoising steps (MDLM, Duo)"})
    num_samples: int = field(default=4, metadata={"help": "sequences to generate"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass kept (1: no filtering)"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling draws"})

    def __post_init__(self) -> None:
        if self.steps < 1 or self.num_samples < 1 or not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling config out of range: {self}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    data: DataConfig
    model: ModelSizeConfig = field(default_factory=ModelSizeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        """Checks across sections, before any process group or model exists."""
        _, layers, heads = SIZES[self.model.size]
        tp, pp = self.parallel.tensor, self.parallel.pipeline
        if heads % tp:
            choices = [k for k in range(1, heads + 1) if heads % k == 0]
            raise ConfigError(
                f"model.size={self.model.size} has {heads} heads, not divisible by "
                f"parallel.tensor={tp}; choose parallel.tensor in {choices}"
            )
        if layers < pp:
            raise ConfigError(
                f"model.size={self.model.size} has {layers} layers, fewer than "
                f"parallel.pipeline={pp} stages; use at most {layers} stages"
            )

    def check_world_size(self, world_size: int) -> None:
        """The layout checks that need the number of processes (`dlm train --nproc`), made
        before anything is launched; the processes repeat them when they start."""
        self.train.accumulation_steps(self.parallel.data_parallel_size(world_size))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, object]:
        """section.key -> value, as MLflow params."""
        return {f"{s}.{k}": v for s, values in self.to_dict().items() for k, v in values.items()}


def load_config(preset: str, overrides: list[str]) -> RunConfig:
    """A preset name (pretrain/presets/NAME.yaml) or a YAML path, then the overrides."""
    path = PRESETS / f"{preset}.yaml" if (PRESETS / f"{preset}.yaml").is_file() else Path(preset)
    if not path.is_file():
        names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise ConfigError(f"no preset {preset!r}: use one of {names} or a YAML file")
    tree = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"override {item!r} is not section.key=value")
        tree.setdefault(section, {})[name] = yaml.safe_load(value)
    return _build(RunConfig, tree, "")


def _build(cls: type, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid: {sorted(fields)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        kwargs[key] = _convert(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def _convert(hint: object, value: object, key: str) -> object:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section; give {key}.FIELD=VALUE")
        return _build(hint, value, key + ".")
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if value is None and type(None) in typing.get_args(hint):
        return None
    target = options[0]
    try:
        if target is bool and not isinstance(value, bool):
            raise ValueError
        if target is float and isinstance(value, int | float | str):
            return float(value)
        if target is int and isinstance(value, bool):
            raise ValueError
        return target(value) if not isinstance(value, target) else value
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {target.__name__}") from None
