"""`dlm reshard`: a training checkpoint, with its optimizer state, step, data position and
RNG, for another tensor x pipeline layout (docs/design.md, Checkpoints).

The optimizer state goes through DeepSpeed's universal format (one file per parameter and
state, whole tensors), which DeepSpeed reloads at any layout; the layer files are cut again
for the new tensor size. `dlm train` does the same on its own when a run directory is resumed
with other parallel sizes; this command does it ahead of time, or into a new run directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dlm_pretrain.common.errors import CheckpointError
from dlm_pretrain.common.files import new_directory, write_atomic
from dlm_pretrain.data_pipeline.manifest import MANIFEST_FILE, TOKENIZER_FILE
from dlm_pretrain.pretrain import checkpoint
from dlm_pretrain.pretrain.config import CONFIG_FILE, RunConfig, load_config, write_run_config
from dlm_pretrain.pretrain.run_records import SAMPLES, TRAIN_LOG, VAL_LOG

# copied to a new run directory with the samples (its MLflow run starts anew)
RUN_RECORDS = (MANIFEST_FILE, TOKENIZER_FILE, TRAIN_LOG, VAL_LOG)


def reshard(run_dir: Path, tensor: int, pipeline: int, out: Path | None = None) -> RunConfig:
    """The latest checkpoint of `run_dir` for `tensor` x `pipeline`: converted beside it, or
    written as the first checkpoint of the run directory `out`. Returns the config to train
    on with the new layout."""
    source = checkpoint.checkpoint_folder(run_dir)
    cfg = _config_for(run_dir, tensor, pipeline, out)
    if checkpoint.read_meta(source)["format"] == checkpoint.WEIGHTS:
        raise CheckpointError(
            f"{source} holds imported weights without optimizer state; train it at any layout"
        )
    if out is None:
        checkpoint.universal_copy(run_dir, tensor)
        return cfg
    with new_directory(out, "resharded run") as staging:
        target = checkpoint.checkpoint_dir(staging) / source.name
        checkpoint.write_universal(source, target, tensor, pipeline)
        write_atomic(checkpoint.checkpoint_dir(staging) / checkpoint.LATEST, source.name.encode())
        for name in RUN_RECORDS:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, staging / name)
        if (run_dir / SAMPLES).is_dir():
            shutil.copytree(run_dir / SAMPLES, staging / SAMPLES)
        revisions = checkpoint.read_meta(source).get("run", {}).get("revisions", [])
        write_run_config(staging, cfg, revisions)  # the next start adds the layout's revision
    return cfg


def _config_for(run_dir: Path, tensor: int, pipeline: int, out: Path | None) -> RunConfig:
    """The run's config at the new layout; its checks (heads and blocks over the parallel
    sizes) run before any work."""
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{run_dir} has no {CONFIG_FILE}; is it a `dlm train` run directory?")
    overrides = [f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}"]
    if out is not None:
        overrides.append(f"train.run_dir={out}")
    return load_config(str(config), overrides)
