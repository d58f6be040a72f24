"""What `dlm eval` evaluates: a run directory, or a folder `dlm export-hf` wrote (read back
through `dlm import-hf` into a temporary run directory; the model stays in memory)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

from dlm_pretrain.checkpoints_tools.export_hf import RUN_CONFIG_KEY
from dlm_pretrain.checkpoints_tools.import_hf import import_hf
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.pretrain.config import CONFIG_FILE
from dlm_pretrain.pretrain.trained_model import TrainedModel, load_trained_model


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def is_hf_export(path: Path) -> bool:
    return (path / "config.json").is_file()


def is_our_export(path: Path) -> bool:
    """A Hugging Face folder `dlm export-hf` wrote (its config.json holds the run's config)."""
    return is_hf_export(path) and RUN_CONFIG_KEY in json.loads((path / "config.json").read_text())


def load_target(path: str | Path) -> TrainedModel:
    """The model at `path`; its run_dir is `path` itself."""
    path = Path(path)
    if is_run_dir(path):
        return load_trained_model(path)
    if is_hf_export(path):
        with tempfile.TemporaryDirectory(prefix="dlm-eval-") as tmp:
            import_hf(path, Path(tmp) / path.name)
            model = load_trained_model(Path(tmp) / path.name)
        step = json.loads((path / "config.json").read_text())["dlm_checkpoint"]["step"]
        return replace(model, run_dir=path, step=step)  # the exported training step
    raise ConfigError(
        f"{path} is neither a run directory (config.yaml) nor a `dlm export-hf` folder "
        "(config.json); pass one of those"
    )
