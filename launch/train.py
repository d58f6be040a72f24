"""The training entry point every launcher starts:

    deepspeed --num_gpus N --module dlm_pretrain.launch.train [PRESET] [section.key=value ...]
    torchrun --nproc-per-node N -m dlm_pretrain.launch.train [PRESET] [section.key=value ...]
    srun python -m dlm_pretrain.launch.train [PRESET] [section.key=value ...]   (a task per rank)
    python -m dlm_pretrain.launch.train [PRESET] [section.key=value ...]        (one process)

It configures the output (launch.quiet; DLM_VERBOSE=1 from `dlm -v` shows the libraries'
own), loads the config and calls pretrain.trainer.run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from dlm_pretrain.common.errors import ConfigError, DlmError
from dlm_pretrain.data_pipeline import DataConfig, PrepareConfig
from dlm_pretrain.data_pipeline.manifest import MANIFEST_FILE
from dlm_pretrain.launch.quiet import configure_output, hidden_prints, verbose_requested
from dlm_pretrain.parallel.groups import environment_from_slurm
from dlm_pretrain.pretrain.config import RunConfig, load_config

# The embedded default dataset (data.path's default), prepared on first use. 5% for validation:
# a distribution's trimmed standard library (Ubuntu's python3.12, ~570 files) left 1% of its
# documents, split by hash, shorter than one sequence.
DEFAULT_DATA = PrepareConfig(out=DataConfig().path, seq_len=256, val_fraction=0.05)


def needs_default_data(data_path: str) -> bool:
    """Whether `data_path` is the embedded default dataset and is not prepared yet."""
    return data_path == DEFAULT_DATA.out and not (Path(data_path) / MANIFEST_FILE).is_file()


def load_run_config(preset: str | None, overrides: list[str]) -> RunConfig:
    """The preset and overrides; an empty tracking.uri falls back to MLFLOW_TRACKING_URI."""
    cfg = load_config(preset, overrides)
    if not cfg.tracking.uri and os.environ.get("MLFLOW_TRACKING_URI"):
        tracking = cfg.tracking.model_copy(update={"uri": os.environ["MLFLOW_TRACKING_URI"]})
        cfg = cfg.model_copy(update={"tracking": tracking})
    return cfg


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "settings",
        nargs="*",
        metavar="[PRESET] KEY=VALUE",
        help="a preset (pretrain/presets/NAME.yaml, or a YAML file) holding what differs from "
        "the defaults, then any key below as section.key=value, e.g. train.steps=1000; an "
        "argument with '=' is always a key",
    )


def split_run_arguments(settings: Sequence[str]) -> tuple[str | None, list[str]]:
    """[PRESET] and the overrides: anything with '=' is an override, in any position."""
    presets = [s for s in settings if "=" not in s]
    if len(presets) > 1:
        raise ConfigError(
            f"one preset at most, got {presets}; write config values as section.key=value"
        )
    return (presets[0] if presets else None), [s for s in settings if "=" in s]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dlm_pretrain.launch.train", description="One training run."
    )
    add_run_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    environment_from_slurm()  # srun without a launcher; before the GPU is picked
    verbose = verbose_requested(False)  # `dlm -v train` exported it
    configure_output(verbose)
    log = logging.getLogger("dlm")
    try:
        cfg = load_run_config(*split_run_arguments(args.settings))
        with hidden_prints(verbose):
            from dlm_pretrain.pretrain.trainer import run  # deepspeed, megatron-core: seconds

            run_dir = run(cfg)
    except DlmError as e:
        log.error("%s", e)
        return 2
    log.info("run directory: %s", run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
