"""The sweep file: which objectives, sizes and FLOP budgets a study trains, the settings all
its runs share, and where they run. One YAML file is the study's single source of truth;
`dlm sweep plan | launch | status | fit` all read it (README "FLOP-matched studies")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from dlm_pretrain.common.config import Section
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.parallel.config import SIZES
from dlm_pretrain.pretrain.tracking import default_tracking_uri
from pydantic import Field, field_validator


class LrRule(Section):
    """Peak learning rate by model size: value x (N / reference_parameters)^(-exponent), N the
    non-embedding parameters; exponent 0 gives every size the same rate. The final rate keeps
    the ratio min_lr_ratio to the peak."""

    value: float = Field(default=1e-3, gt=0, description="peak rate at reference_parameters")
    exponent: float = Field(default=0.0, ge=0, description="0: one rate for every size")
    reference_parameters: float = Field(default=1e6, gt=0, description="N where lr = value")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="optim.min_lr / optim.lr")

    def peak(self, parameters: float) -> float:
        return self.value * (parameters / self.reference_parameters) ** -self.exponent


class Checks(Section):
    """What `dlm sweep plan` refuses before anything starts."""

    min_steps: int = Field(default=100, ge=1, description="fewer optimizer steps: refused")
    max_epochs: float = Field(default=1.0, gt=0, description="more passes over the data: refused")


class SlurmBackend(Section):
    """One sbatch job per run on one node; a preemption (or the time limit's warning)
    checkpoints and requeues the job, which resumes where it stopped."""

    partition: str = Field(default="", description="'' : the cluster's default partition")
    time: str = Field(default="04:00:00", min_length=1, description="job time limit")
    gpus_per_node: int = Field(default=0, ge=0, description="GPUs requested per node")
    signal_seconds: int = Field(default=120, ge=10, description="warning before the time limit")
    sbatch: tuple[str, ...] = Field(default=(), description="more #SBATCH options, as written")


class Backend(Section):
    kind: Literal["local", "hostfile", "slurm"] = Field(default="local", description="launcher")
    nproc: int = Field(default=1, ge=1, description="processes per run (per node)")
    concurrent: int = Field(default=1, ge=1, description="local: runs at once, on disjoint ranks")
    hostfile: str = Field(default="", description="hostfile: the deepspeed hostfile")
    slurm: SlurmBackend = SlurmBackend()


class SweepTracking(Section):
    uri: str = Field(default="", description="'': $MLFLOW_TRACKING_URI, else beside runs_dir")
    experiment: str = Field(default="", description="'': the sweep's name")


class SweepConfig(Section):
    name: str = Field(min_length=1, description="the study's name (MLflow parent run, tags)")
    runs_dir: str = Field(min_length=1, description="one run directory per planned run in here")
    objectives: dict[str, dict[str, object]] = Field(
        description="label -> the run settings that make it, e.g. mdlm-ce: {objective.name: mdlm}"
    )
    sizes: tuple[str, ...] = Field(min_length=1, description="model.size presets")
    budgets: tuple[float, ...] = Field(min_length=1, description="training FLOPs per run")
    settings: dict[str, object] = Field(default={}, description="settings every run shares")
    lr: LrRule = LrRule()
    checks: Checks = Checks()
    throughput: float = Field(
        default=0.0, ge=0, description="training FLOP/s of one run for the time estimate (0: none)"
    )
    backend: Backend = Backend()
    tracking: SweepTracking = SweepTracking()

    @field_validator("objectives", mode="before")
    @classmethod
    def _labels(cls, value: object) -> object:
        """A list of objective names is shorthand for {name: {objective.name: name}}."""
        if isinstance(value, list | tuple):
            return {name: {"objective.name": name} for name in value}
        return value

    @field_validator("sizes")
    @classmethod
    def _known_sizes(cls, sizes: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [s for s in sizes if s not in SIZES]
        if unknown:
            raise ConfigError(f"sizes: unknown {unknown}; choose from {', '.join(SIZES)}")
        return sizes

    @field_validator("budgets")
    @classmethod
    def _positive_budgets(cls, budgets: tuple[float, ...]) -> tuple[float, ...]:
        if min(budgets) <= 0:
            raise ConfigError(f"budgets: {list(budgets)} must all be positive numbers of FLOPs")
        return budgets


def tracking_target(sweep: SweepConfig) -> tuple[str, str]:
    """(store URI, experiment) of the sweep: its own, else $MLFLOW_TRACKING_URI, else one sqlite
    store in runs_dir, where the runs' default store already is."""
    uri = sweep.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or default_tracking_uri(Path(sweep.runs_dir) / sweep.name), (
        sweep.tracking.experiment or sweep.name
    )


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no sweep file {path}; write one (README: FLOP-matched studies)")
    tree = yaml.safe_load(path.read_text())
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} is not a YAML mapping of sweep keys")
    try:
        return SweepConfig(**tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
