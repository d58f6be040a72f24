"""Atomic DeepSpeed checkpoints with the loop state, and automatic resume (docs/conventions.md §13).

A save goes to RUN/checkpoints/.incomplete-TAG first (every rank writes its shards there),
is renamed to RUN/checkpoints/TAG once all ranks are done, and only then does `latest` name
it (written to a temporary file and renamed). A kill at any moment leaves `latest` pointing
at a complete checkpoint; leftovers of an interrupted save are removed on the next start.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from dlm_pretrain.common.errors import CheckpointError
from dlm_pretrain.common.files import write_atomic
from dlm_pretrain.parallel.config import TENSOR_SPLIT_DIMS
from dlm_pretrain.pretrain.checkpoint_files import (
    LATEST,
    META_FILE,
    checkpoint_dir,
    latest_tag,
    read_meta,
    read_weights,
    saved_meta,
    write_meta,
    write_weights,
)
from megatron.core import parallel_state

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
# The formats of a checkpoint folder: DeepSpeed's per-rank shards; its per-parameter form (a
# new layout); the parameters alone (`dlm import-hf`: training starts a fresh optimizer).
NATIVE, UNIVERSAL, WEIGHTS = "native", "universal", "weights"

# What DeepSpeed's universal-checkpoint converter needs to merge tensor shards (PipelineModule
# names, e.g. "3.attn_out.weight"): which parameters are replicated and which split along axis
# 1; the rest are split along axis 0 (TENSOR_SPLIT_DIMS).
_SPLIT_NAMES = "|".join(re.escape(name) for name in TENSOR_SPLIT_DIMS)
UNIVERSAL_INFO = {
    "universal_checkpoint_version": 0.2,
    "tp_replicated_parameter_patterns": [rf"^\d+\.(?!(?:{_SPLIT_NAMES})$)"],
    "parameter_with_row_parallelism_patterns": [
        rf"^\d+\.{re.escape(name)}$" for name, dim in TENSOR_SPLIT_DIMS.items() if dim == 1
    ],
}


@dataclass
class LoopState:
    """Everything the loop needs to continue exactly, saved with every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    flops: float = 0.0
    skipped_steps: int = 0


def clean_incomplete(run_dir: str | Path) -> None:
    """Remove what an interrupted save or conversion left behind, and the universal copies of
    checkpoints that are no longer the latest (rank 0, before anything is loaded)."""
    root = checkpoint_dir(run_dir)
    if dist.get_rank() == 0 and root.is_dir():
        current = f"universal-{latest_tag(run_dir)}-"
        for leftover in [*root.glob(".incomplete-*"), *root.glob("universal-*")]:
            if not leftover.name.startswith(current) or leftover.suffix == ".tmp":
                shutil.rmtree(leftover, ignore_errors=True)
    dist.barrier()


def save(engine, run_dir: str | Path, state: LoopState, extra: dict, meta: dict) -> str:
    """Save model, optimizer, scheduler and `extra` (reader position, config, layout) atomically;
    `meta` (layout, layers, vocab_size, validation) goes to the meta file for the tools."""
    root = checkpoint_dir(run_dir)
    tag = f"step{state.step:08d}"
    staging = root / f".incomplete-{tag}"
    client_state = {
        "format_version": FORMAT_VERSION,
        "loop": asdict(state),
        "rng": _rng_states(),
        "universal_checkpoint_info": UNIVERSAL_INFO,
        **extra,
    }
    engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        write_meta(
            staging / tag, {"step": state.step, "format": NATIVE, "loop": asdict(state), **meta}
        )
        _publish(staging / tag, root / tag)
        shutil.rmtree(staging, ignore_errors=True)
        write_atomic(root / LATEST, tag.encode())
    dist.barrier()
    return tag


def _publish(staging: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def checkpoint_folder(run_dir: str | Path, step: int | None = None) -> Path:
    """A finished checkpoint of the run: the latest, or `step`'s."""
    root = checkpoint_dir(run_dir)
    tag = latest_tag(run_dir)
    if tag is None:
        raise CheckpointError(f"{run_dir} holds no finished checkpoint; train it with `dlm train`")
    if step is not None:
        tag = f"step{step:08d}"
    folder = root / tag
    if not (folder / META_FILE).is_file():
        saved = sorted(p.name for p in root.glob("step*") if (p / META_FILE).is_file())
        raise CheckpointError(f"{folder} is not a finished checkpoint; the run has {saved}")
    return folder


def resume_source(run_dir: str | Path, layout: dict) -> Path | None:
    """Where DeepSpeed loads the latest checkpoint from under `layout`: None for the run's own
    shards (saved with this layout), else a folder in the universal format."""
    meta = saved_meta(run_dir)
    if meta is None or meta["format"] == WEIGHTS:
        return None
    if meta["format"] == NATIVE and meta["layout"] == layout:
        return None
    if meta["format"] == UNIVERSAL and meta["layout"]["tensor"] == layout["tensor"]:
        return checkpoint_dir(run_dir)
    log.info("the checkpoint was saved with %s: converting it for %s", meta["layout"], layout)
    return convert_to_universal(run_dir, layout["tensor"])


def universal_dir(run_dir: str | Path, tensor: int) -> Path:
    """Where the latest checkpoint is converted for a new layout (see load)."""
    return checkpoint_dir(run_dir) / f"universal-{latest_tag(run_dir)}-tensor{tensor}"


def convert_to_universal(run_dir: str | Path, tensor: int) -> Path:
    """DeepSpeed's ZeRO-1 optimizer shards only reload on the layout they were saved with; its
    universal format (one file per parameter and state) reloads on any. Rank 0 converts the
    latest checkpoint once per tensor size; returns the folder to load from."""
    if dist.get_rank() == 0:
        universal_copy(run_dir, tensor)
    dist.barrier()
    return universal_dir(run_dir, tensor)


def universal_copy(run_dir: str | Path, tensor: int) -> Path:
    """The latest checkpoint in the universal format for `tensor` ranks, converted once and
    kept beside it (one process; `dlm reshard` and the first rank of a resumed run)."""
    out = universal_dir(run_dir, tensor)
    if not out.is_dir():
        staging = out.with_name(out.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        tag = latest_tag(run_dir)
        write_universal(checkpoint_dir(run_dir) / tag, staging / tag, tensor)
        os.replace(staging, out)
    return out


def write_universal(source: Path, target: Path, tensor: int, pipeline: int | None = None) -> None:
    """`source`, a finished checkpoint of any layout, as a universal checkpoint in `target`
    that DeepSpeed loads at `tensor` ranks and any pipeline and data-parallel size: the
    per-parameter optimizer state (DeepSpeed's converter) and the layer files cut for `tensor`
    (DeepSpeed reads them before it overwrites the weights from the per-parameter state)."""
    meta = read_meta(source)
    weights = read_weights(source)  # checks every layer file before any work
    if meta["format"] == UNIVERSAL:
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("layer_*", META_FILE))
    else:
        _run_converter(source, target)
        (target.parent / "latest_universal").unlink(missing_ok=True)  # the converter's, unused
    for stale in target.glob("layer_*-model_states.pt"):
        stale.unlink()
    write_weights(weights, target, tensor)
    layout = {
        **meta["layout"],
        "tensor": tensor,
        "pipeline": pipeline or meta["layout"]["pipeline"],
    }
    write_meta(target, {**meta, "format": UNIVERSAL, "layout": layout})


def _run_converter(source: Path, target: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(source),
        "--output_folder",
        str(target),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise CheckpointError(
            f"converting {source} to DeepSpeed's universal format failed; resume with the "
            f"layout it was saved with.\n{result.stderr[-2000:]}"
        )


def load(
    engine, run_dir: str | Path, layout: dict, universal: Path | None = None
) -> tuple[LoopState, dict] | None:
    """Resume from `latest` if there is one; checks the format and the parallel layout.
    `universal`: the folder of its universal form, for a layout other than the saved one."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(str(universal or checkpoint_dir(run_dir)), tag=tag)
    if path is None:
        raise CheckpointError(f"{checkpoint_dir(run_dir) / tag} could not be loaded")
    if client.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {client.get('format_version')}, this dlm reads "
            f"{FORMAT_VERSION}; start a new run directory"
        )
    saved = client["layout"]
    if universal is None and saved != layout:
        raise CheckpointError(f"{path} was saved with layout {saved}, not {layout}")
    _restore_rng_states(client["rng"])
    return LoopState(**client["loop"]), client


def _rng_states() -> dict:
    """The generators dropout draws from: the host's and, on a GPU, the current device's."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(states["cuda"])
    elif "cuda" in states:
        log.warning("resuming a GPU checkpoint without a GPU: dropout masks will differ")


def load_weights(module, folder: Path) -> None:
    """The parameters saved in `folder`, whatever tensor and pipeline sizes saved them, into a
    PipelineModule of this process's layout (sampling, export, import): each whole parameter
    is cut again along its split axis for this tensor rank."""
    weights = read_weights(folder)
    group = parallel_state.get_tensor_model_parallel_group()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if tensor is None:
            continue
        whole = weights[name]
        dim = TENSOR_SPLIT_DIMS.get(name.split(".", 1)[1])
        local = whole if dim is None else whole.chunk(group.size(), dim)[group.rank()]
        with torch.no_grad():
            tensor.copy_(local)
