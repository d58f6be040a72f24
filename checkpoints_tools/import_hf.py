"""`dlm import-hf`: a folder written by `dlm export-hf` as a run directory that `dlm train`
fine-tunes (docs/design.md, Checkpoints).

The run directory gets the exported run's configuration (with the new parallel sizes and
the tokenizer's hash, so data prepared with another tokenizer is refused), the sentencepiece
model, the manifest of the data it was trained on, and a first checkpoint in the `weights`
format: the parameters only, as layer files for the new tensor size. Training loads them
before DeepSpeed builds its optimizer, so the optimizer, the learning-rate schedule and the
data position start fresh.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import yaml
from dlm_pretrain.checkpoints_tools.export_hf import DATASET_MANIFEST, RUN_CONFIG_KEY
from dlm_pretrain.checkpoints_tools.hf_layout import from_hf
from dlm_pretrain.checkpoints_tools.hf_tokenizer import read_sentencepiece
from dlm_pretrain.common.errors import CheckpointError
from dlm_pretrain.common.files import new_directory, write_atomic
from dlm_pretrain.data_pipeline import Tokenizer
from dlm_pretrain.data_pipeline.manifest import MANIFEST_FILE, TOKENIZER_FILE
from dlm_pretrain.pretrain import checkpoint
from dlm_pretrain.pretrain.checkpoint_files import write_meta, write_weights
from dlm_pretrain.pretrain.config import CONFIG_FILE, RunConfig, load_config, write_run_config
from dlm_pretrain.pretrain.model_spec import padded_vocab_size
from safetensors.torch import load_file
from torch import Tensor

WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def import_hf(folder: Path, out: Path, tensor: int = 1, pipeline: int = 1) -> RunConfig:
    """Write the run directory `out` from the export in `folder`; returns its config."""
    exported = _exported_config(folder)
    tokenizer = Tokenizer(read_sentencepiece(folder))
    padded = padded_vocab_size(tokenizer.vocab_size, tensor)
    weights = from_hf(read_hf_weights(folder), exported["n_heads"], padded)
    with new_directory(out, "imported run") as staging:
        cfg = _run_config(exported[RUN_CONFIG_KEY], staging, out, tensor, pipeline, tokenizer)
        _write_checkpoint(weights, checkpoint.checkpoint_dir(staging), cfg, padded)
        (staging / TOKENIZER_FILE).write_bytes(tokenizer.model_bytes)
        shutil.copyfile(folder / DATASET_MANIFEST, staging / MANIFEST_FILE)  # what it saw
    return cfg


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """model.safetensors, or every shard its index names."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = [WEIGHTS_FILE]
    state = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the export is incomplete")
        try:
            state |= load_file(path)
        except Exception as error:  # a truncated file: safetensors names no file
            raise CheckpointError(
                f"{path} cannot be read ({error}); the export is damaged"
            ) from error
    return state


def _exported_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a `dlm export-hf` folder?")
    exported = json.loads(path.read_text())
    if RUN_CONFIG_KEY not in exported:
        raise CheckpointError(
            f"{path} has no {RUN_CONFIG_KEY}: the folder was not written by `dlm export-hf`"
        )
    return exported


def _run_config(
    run: dict, staging: Path, out: Path, tensor: int, pipeline: int, tokenizer: Tokenizer
) -> RunConfig:
    """The exported run's config at the new layout, its tokenizer pinned; checked (heads and
    blocks over the parallel sizes) before the weights are read."""
    path = staging / CONFIG_FILE
    path.write_text(yaml.safe_dump(run, sort_keys=False))
    overrides = [
        f"parallel.tensor={tensor}",
        f"parallel.pipeline={pipeline}",
        f"train.run_dir={out}",
        f"data.tokenizer_sha256={tokenizer.sha256}",
    ]
    cfg = load_config(str(path), overrides)
    write_run_config(staging, cfg, [])  # a new run: its first start is its first revision
    return cfg


def _write_checkpoint(weights: dict, root: Path, cfg: RunConfig, padded: int) -> None:
    folder = root / "step00000000"
    folder.mkdir(parents=True)
    write_weights(weights, folder, cfg.parallel.tensor)
    layout = {"tensor": cfg.parallel.tensor, "pipeline": cfg.parallel.pipeline, "data": 1}
    meta = {
        "step": 0,
        "format": checkpoint.WEIGHTS,
        "loop": asdict(checkpoint.LoopState()),
        "layout": layout,
        "layers": 1 + max(int(key.split(".", 1)[0]) for key in weights),
        "vocab_size": padded,
        "validation": None,
    }
    write_meta(folder, meta)
    write_atomic(root / checkpoint.LATEST, folder.name.encode())
