"""The run configuration: one typed tree of sections (docs/conventions.md §3-5), loaded from
an optional YAML preset plus `key=value` overrides and checked before any process group
exists. The field defaults are the only defaults: with no preset and no override they
describe `dlm train`'s run, a small MDLM on the embedded corpus, a few minutes on 2 CPU cores.
A preset holds only what differs from them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from dlm_pretrain.common.config import Section, apply_overrides, one_or_many
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.common.files import write_atomic
from dlm_pretrain.data_pipeline.config import DataConfig
from dlm_pretrain.parallel.config import SIZES, ParallelConfig
from dlm_pretrain.pretrain.flops import CONVENTIONS
from dlm_pretrain.pretrain.objectives import OBJECTIVES, build_objective
from dlm_pretrain.pretrain.objectives.draws import FINAL_STEPS, TOP_P_PLACEMENTS
from dlm_pretrain.pretrain.objectives.gidd import LOSS_WEIGHTINGS
from dlm_pretrain.pretrain.objectives.mdlm import LOSS_TYPES
from dlm_pretrain.pretrain.revisions import check_allowable
from pydantic import Field, field_validator, model_validator

PRESETS = Path(__file__).parent / "presets"


class ModelSizeConfig(Section):
    """The backbone; its vocabulary and sequence length come from the dataset's manifest."""

    size: Literal[tuple(SIZES)] = Field(
        default="cpu-small", description="(d, layers, heads) of parallel.config.SIZES"
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="residual dropout")
    init_seed: int = Field(default=0, ge=0, description="seed of the initial parameters")


class ObjectiveConfig(Section):
    name: Literal[tuple(OBJECTIVES)] = Field(default="mdlm", description="training objective")
    loss_type: Literal[LOSS_TYPES] = Field(
        default="cross_entropy", description="MDLM and Eso-LM training loss"
    )
    p_uniform: float = Field(
        default=0.1, ge=0, lt=1, description="GIDD: uniform noise share at t = 1/2"
    )
    gamma: float = Field(default=1.0, gt=0, le=2, description="GIDD: mixing schedule exponent")
    loss_weighting: Literal[LOSS_WEIGHTINGS] = Field(
        default="dynamic", description="GIDD training weights (validation: the ELBO)"
    )
    alpha_0: float = Field(
        default=1.0, ge=0, le=1, description="Eso-LM: clean share where diffusion ends"
    )
    batch_split: float = Field(
        default=1.0, ge=0, le=1, description="Eso-LM: share of rows in the diffusion branch"
    )
    seed: int = Field(default=0, ge=0, description="seed of t and of the corruption")


class OptimConfig(Section):
    """AdamW with linear warmup then cosine decay (docs/algorithms.md §6.3)."""

    lr: float = Field(default=1e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(default=1e-4, ge=0, description="learning rate at the end")
    beta1: float = Field(default=0.9, ge=0, lt=1, description="Adam beta1")
    beta2: float = Field(default=0.95, ge=0, lt=1, description="Adam beta2")
    eps: float = Field(default=1e-8, gt=0, description="Adam epsilon")
    # on all parameters, norms and biases included (docs/pitfalls.md P12)
    weight_decay: float = Field(default=0.1, ge=0, description="on all parameters")
    warmup_fraction: float = Field(default=0.01, ge=0, le=1, description="warmup share of steps")
    min_warmup_steps: int = Field(default=20, ge=0, description="warmup at least this long")
    grad_clip: float = Field(default=1.0, gt=0, description="global gradient-norm clip")


class TrainConfig(Section):
    run_dir: str = Field(
        default="runs/default", min_length=1, description="checkpoints, logs, samples"
    )
    global_batch: int = Field(default=16, ge=1, description="sequences per optimizer step")
    micro_batch: int = Field(default=8, ge=1, description="sequences per forward per rank")
    steps: int = Field(default=120, ge=0, description="optimizer steps (0: from flops_budget)")
    flops_budget: float = Field(
        default=0.0, ge=0, description="training FLOPs; sets steps (with steps=0)"
    )
    flops_convention: Literal[CONVENTIONS] = Field(
        default="exact", description="FLOPs counted exactly, or as the paper's reference"
    )
    dtype: Literal["", "float32", "bfloat16"] = Field(
        default="", description="compute dtype ('': bfloat16 on a GPU, float32 on CPU)"
    )
    log_every: int = Field(default=10, ge=1, description="steps between log lines")
    val_every: int = Field(default=40, ge=1, description="steps between validations")
    val_sequences: int = Field(default=64, ge=0, description="validation sequences (0: all)")
    checkpoint_every: int = Field(default=40, ge=1, description="steps between checkpoints")
    max_bad_steps: int = Field(default=5, ge=1, description="non-finite steps in a row: stop")
    sample_steps: int = Field(default=64, ge=1, description="denoising steps of the samples")
    num_samples: int = Field(default=2, ge=1, description="samples written at each validation")
    peak_flops: float = Field(default=0.0, ge=0, description="device peak for MFU (0: table)")
    allow_changes: tuple[str, ...] = Field(
        default=(),
        description="identity settings (e.g. objective.name, or the section optim) this "
        "restart may change from the checkpoint's; recorded with its revision, used once",
    )

    _allow_one_or_many = field_validator("allow_changes", mode="before")(one_or_many)

    @model_validator(mode="after")
    def _batch_and_length(self) -> TrainConfig:
        if self.global_batch % self.micro_batch:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not divisible by train.micro_batch="
                f"{self.micro_batch}; use a micro_batch that divides it"
            )
        if (self.steps > 0) == (self.flops_budget > 0):
            raise ConfigError(
                f"set exactly one of train.steps ({self.steps}) and train.flops_budget "
                f"({self.flops_budget}); a budget needs train.steps=0"
            )
        check_allowable(self.allow_changes)
        return self

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


class TrackingConfig(Section):
    uri: str = Field(
        default="", description="MLflow store ('': $MLFLOW_TRACKING_URI, else next to run_dir)"
    )
    experiment: str = Field(default="dlm", min_length=1, description="MLflow experiment")
    parent_run_id: str = Field(default="", description="MLflow run this run is a child of")
    tags: dict[str, str] = Field(default={}, description="MLflow tags of the run")


class SamplingConfig(Section):
    """What `dlm sample` generates from a run's latest checkpoint."""

    steps: int = Field(
        default=128,
        ge=1,
        description="diffusion steps (the paper's config: 1000); AR always takes seq_len - 1, "
        "Eso-LM adds one per token of its sequential tail",
    )
    num_samples: int = Field(default=4, ge=1, description="sequences to generate")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus mass kept (1: no filtering)")
    top_p_on: Literal[TOP_P_PLACEMENTS] = Field(
        default="reference",
        description="where top_p filters: reference = as the paper's code (Duo: the posterior, "
        "the others: x̂); denoiser = x̂ in every family (the same for all but Duo)",
    )
    final_step: Literal[FINAL_STEPS] = Field(
        default="default",
        description="the last step (MDLM, Duo: from t = 1e-5; GIDD: to s = 0): greedy = "
        "argmax x̂ where still undecided, ancestral = a draw with alpha_s = 1; default = the "
        "family's own (Duo greedy, MDLM and GIDD ancestral); AR and Eso-LM have none",
    )
    start_token: Literal["bos", "eos"] = Field(
        default="bos",
        description="AR's first token: bos as the paper's code (eos if the tokenizer has no "
        "BOS), or eos, the token before every document in our packed data",
    )
    seed: int = Field(default=0, ge=0, description="seed of the sampling draws")
    kv_cache: bool = Field(default=True, description="Eso-LM: keep decoded tokens' keys, values")


class RunConfig(Section):
    data: DataConfig = DataConfig()
    model: ModelSizeConfig = ModelSizeConfig()
    parallel: ParallelConfig = ParallelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _layout_fits_the_model(self) -> RunConfig:
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
        build_objective(self.objective).check_micro_batch(self.train.micro_batch)
        return self

    def check_world_size(self, world_size: int) -> None:
        """The layout checks that need the number of processes (`dlm train --nproc`), made
        before anything is launched; the processes repeat them when they start."""
        self.train.accumulation_steps(self.parallel.data_parallel_size(world_size))

    def to_dict(self) -> dict:
        return self.model_dump()

    def flat(self) -> dict[str, object]:
        """section.key -> value, as MLflow params."""
        return {f"{s}.{k}": v for s, values in self.to_dict().items() for k, v in values.items()}


CONFIG_FILE = "config.yaml"  # in a run directory: the settings in effect and the revisions
REVISIONS_KEY = "revisions"  # in a run's config.yaml: the run's history, not a setting


def config_text(cfg: RunConfig, revisions: list[dict], allowed: tuple[str, ...]) -> str:
    """A run directory's config.yaml: the settings in effect (a preset for `dlm train`, with
    `allowed` as train.allow_changes), then every revision of the run with the step it took
    effect, which a preset load skips."""
    settings = cfg.to_dict()
    settings["train"]["allow_changes"] = list(allowed)
    header = (
        "# The run's settings now. `revisions`: its first start and each restart that changed\n"
        "# a setting, with the step it took effect (read by dlm, skipped as a preset).\n"
    )
    body = yaml.safe_dump(settings, sort_keys=False)
    return header + body + yaml.safe_dump({REVISIONS_KEY: revisions}, sort_keys=False)


def write_run_config(
    run_dir: Path, cfg: RunConfig, revisions: list[dict], allowed: tuple[str, ...] = ()
) -> str:
    """Write RUN_DIR/config.yaml (config_text) atomically; returns its text."""
    text = config_text(cfg, revisions, allowed)
    write_atomic(Path(run_dir) / CONFIG_FILE, text.encode())
    return text


def load_config(preset: str | None, overrides: list[str]) -> RunConfig:
    """The field defaults, then a preset (pretrain/presets/NAME.yaml or a YAML path), then the
    `section.key=value` overrides."""
    return RunConfig(**apply_overrides(RunConfig, _preset_tree(preset), overrides))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def _preset_tree(preset: str | None) -> dict:
    if preset is None:
        return {}
    named = PRESETS / f"{preset}.yaml"
    path = named if named.is_file() else Path(preset)
    if not path.is_file():
        raise ConfigError(f"no preset {preset!r}: use one of {preset_names()} or a YAML file")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} is not a YAML mapping of sections")
    tree.pop(REVISIONS_KEY, None)  # a run directory's config.yaml
    return tree
