"""The training entry point every launcher starts:

    deepspeed --num_gpus N --module dlm_pretrain.launch.train [PRESET] [section.key=value ...]
    torchrun --nproc-per-node N -m dlm_pretrain.launch.train [PRESET] [section.key=value ...]
    srun python -m dlm_pretrain.launch.train [PRESET] [section.key=value ...]   (a task per rank)
    python -m dlm_pretrain.launch.train [PRESET] [section.key=value ...]        (one process)

It configures logging, loads the config and calls pretrain.trainer.run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist
from dlm_pretrain.common.errors import DlmError
from dlm_pretrain.data_pipeline import PrepareConfig
from dlm_pretrain.data_pipeline.manifest import MANIFEST_FILE
from dlm_pretrain.parallel.groups import environment_from_slurm
from dlm_pretrain.pretrain.config import RunConfig, load_config

# The embedded default dataset (the default preset's data.path), prepared on first use.
DEFAULT_DATA = PrepareConfig(out="data/stdlib", seq_len=256)


def needs_default_data(data_path: str) -> bool:
    """Whether `data_path` is the embedded default dataset and is not prepared yet."""
    return data_path == DEFAULT_DATA.out and not (Path(data_path) / MANIFEST_FILE).is_file()


class _RankZeroOnly(logging.Filter):
    """Ranks other than 0 show warnings and errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return rank == 0 or record.levelno >= logging.WARNING


def configure_logging() -> None:
    """INFO on rank 0, warnings elsewhere; megatron-core's notices about optional fused
    kernels (Transformer Engine, Apex: not installable here) are silenced."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="megatron")
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_RankZeroOnly())
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=[handler]
    )


def load_run_config(preset: str, overrides: list[str]) -> RunConfig:
    """The preset and overrides; an empty tracking.uri falls back to MLFLOW_TRACKING_URI."""
    cfg = load_config(preset, overrides)
    if not cfg.tracking.uri and os.environ.get("MLFLOW_TRACKING_URI"):
        tracking = dataclasses.replace(cfg.tracking, uri=os.environ["MLFLOW_TRACKING_URI"])
        cfg = dataclasses.replace(cfg, tracking=tracking)
    return cfg


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "preset",
        nargs="?",
        default="default",
        help="preset name (pretrain/presets/NAME.yaml) or a YAML file",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override any config value, e.g. train.steps=1000",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dlm_pretrain.launch.train", description="One training run."
    )
    add_run_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    environment_from_slurm()  # srun without a launcher; before the GPU is picked
    configure_logging()
    from dlm_pretrain.pretrain.trainer import run  # deepspeed and megatron-core: seconds to import

    try:
        cfg = load_run_config(args.preset, args.overrides)
        run_dir = run(cfg)
    except DlmError as e:
        logging.getLogger("dlm").error("%s", e)
        return 2
    logging.getLogger("dlm").info("run directory: %s", run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
