"""The parameters of a checkpoint folder, read and written without DeepSpeed or megatron.

A DeepSpeed pipeline checkpoint holds one file per (layer, tensor rank),
`layer_IDX-model_RANK-model_states.pt`: the layer's parameters as that rank holds them, under
their names inside the layer. Joined along `TENSOR_SPLIT_DIMS` they give the whole model,
whatever tensor and pipeline sizes saved it (the pipeline only decided which process wrote
which layer); cut again they give another tensor size's files. Keys of the whole model are
the pipeline's: "LAYER.name", e.g. "3.qkv.weight" (layer 0 is the input stage, the last the
output stage). Megatron's layers also save an `_extra_state` entry (None), kept as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from dlm_pretrain.common.errors import CheckpointError
from dlm_pretrain.common.files import write_atomic
from dlm_pretrain.parallel.config import TENSOR_SPLIT_DIMS
from torch import Tensor

LATEST = "latest"  # in checkpoints/: the tag of the newest finished checkpoint
META_FILE = "dlm_meta.json"  # step, layout, vocabulary and layer count: readable before any engine


def read_meta(folder: Path) -> dict:
    path = folder / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a finished checkpoint ({META_FILE} is missing)")
    return json.loads(path.read_text())


def write_meta(folder: Path, meta: dict) -> None:
    write_atomic(folder / META_FILE, json.dumps(meta, indent=1).encode())


def layer_file(folder: Path, layer: int, rank: int) -> Path:
    return folder / f"layer_{layer:02d}-model_{rank:02d}-model_states.pt"


def read_weights(folder: Path) -> dict[str, Tensor | None]:
    """The whole model saved in `folder`, float32 as trained, in one process."""
    meta = read_meta(folder)
    tensor = meta["layout"]["tensor"]
    state = {}
    for layer in range(meta["layers"]):
        shards = [_load(layer_file(folder, layer, rank)) for rank in range(tensor)]
        for name, first in shards[0].items():
            dim = TENSOR_SPLIT_DIMS.get(name)
            joined = first if dim is None else torch.cat([s[name] for s in shards], dim)
            state[f"{layer}.{name}"] = joined
    return state


def write_weights(state: dict[str, Tensor | None], folder: Path, tensor: int) -> None:
    """The layer files of `state` for `tensor` ranks (the pipeline size does not matter)."""
    layers: dict[int, dict[str, Tensor | None]] = {}
    for key, value in state.items():
        layer, name = key.split(".", 1)
        layers.setdefault(int(layer), {})[name] = value
    for layer, params in layers.items():
        for rank in range(tensor):
            shard = {name: _cut(name, value, tensor, rank) for name, value in params.items()}
            torch.save(shard, layer_file(folder, layer, rank))


def _cut(name: str, value: Tensor | None, tensor: int, rank: int) -> Tensor | None:
    dim = TENSOR_SPLIT_DIMS.get(name)
    if dim is None:
        return value
    if value.shape[dim] % tensor:
        raise CheckpointError(
            f"{name} has {value.shape[dim]} rows along axis {dim}, which {tensor} tensor ranks "
            "cannot split evenly; choose a tensor size that divides it"
        )
    return value.chunk(tensor, dim)[rank].clone()  # a view would save the whole tensor


def _load(path: Path) -> dict[str, Tensor | None]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or corrupt file: torch names no file
        raise CheckpointError(
            f"{path} cannot be read ({error}); the checkpoint is damaged, use an earlier one"
        ) from error


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir: str | Path) -> str | None:
    path = checkpoint_dir(run_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def saved_meta(run_dir: str | Path) -> dict | None:
    """The meta file of the latest checkpoint (step, format, layout, ...), or None."""
    tag = latest_tag(run_dir)
    return None if tag is None else read_meta(checkpoint_dir(run_dir) / tag)
