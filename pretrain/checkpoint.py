"""Atomic DeepSpeed checkpoints with the loop state, and automatic resume (docs/conventions.md §13).

A save goes to RUN/checkpoints/.incomplete-TAG first (every rank writes its shards there),
is renamed to RUN/checkpoints/TAG once all ranks are done, and only then does `latest` name
it (written to a temporary file and renamed). A kill at any moment leaves `latest` pointing
at a complete checkpoint; leftovers of an interrupted save are removed on the next start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from dlm_pretrain.common.errors import CheckpointError
from dlm_pretrain.common.files import write_atomic
from megatron.core import parallel_state

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
LATEST = "latest"
META_FILE = "dlm_meta.json"  # layout and step, readable before the engine exists

# What DeepSpeed's universal-checkpoint converter needs to merge and re-split parameters
# (PipelineModule names, e.g. "3.attn_out.weight").
UNIVERSAL_INFO = {
    "universal_checkpoint_version": 0.2,
    "tp_replicated_parameter_patterns": [
        r"^\d+\.norm\d?\.weight$",
        r"^\d+\.modulation\.(weight|bias)$",
        r"^\d+\.time_embedding\..*$",
        r"^\d+\.fc2\.bias$",
    ],
    "parameter_with_row_parallelism_patterns": [r"^\d+\.attn_out\.weight$", r"^\d+\.fc2\.weight$"],
}


@dataclass
class LoopState:
    """Everything the loop needs to continue exactly, saved with every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    flops: float = 0.0
    skipped_steps: int = 0


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir: str | Path) -> str | None:
    path = checkpoint_dir(run_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def clean_incomplete(run_dir: str | Path) -> None:
    """Remove what an interrupted save left behind (rank 0, before anything is loaded)."""
    root = checkpoint_dir(run_dir)
    if dist.get_rank() == 0 and root.is_dir():
        for leftover in root.glob(".incomplete-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    dist.barrier()


def save(engine, run_dir: str | Path, state: LoopState, extra: dict) -> str:
    """Save model, optimizer, scheduler and `extra` (reader position, config, layout) atomically."""
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
        meta = {"step": state.step, "layout": extra["layout"]}
        write_atomic(staging / tag / META_FILE, json.dumps(meta).encode())
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / tag, final)
        shutil.rmtree(staging, ignore_errors=True)
        write_atomic(root / LATEST, tag.encode())
    dist.barrier()
    return tag


def saved_layout(run_dir: str | Path) -> dict | None:
    """The parallel layout of the latest checkpoint, or None if there is none."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    return json.loads((checkpoint_dir(run_dir) / tag / META_FILE).read_text())["layout"]


def universal_dir(run_dir: str | Path) -> Path:
    """Where the latest checkpoint is converted for a new data-parallel size (see load)."""
    return checkpoint_dir(run_dir) / f"universal-{latest_tag(run_dir)}"


def convert_to_universal(run_dir: str | Path) -> None:
    """DeepSpeed's ZeRO-1 optimizer shards only reload on the data-parallel size they were
    saved with; its universal format reloads on any (rank 0 converts, once)."""
    tag = latest_tag(run_dir)
    out = universal_dir(run_dir)
    if dist.get_rank() == 0 and not (out / tag).is_dir():
        staging = out.with_name(out.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        command = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(checkpoint_dir(run_dir) / tag),
            "--output_folder",
            str(staging / tag),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise CheckpointError(
                f"converting {checkpoint_dir(run_dir) / tag} for a new data-parallel size "
                f"failed; resume with the old size.\n{result.stderr[-2000:]}"
            )
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)
    dist.barrier()


def load(
    engine, run_dir: str | Path, layout: dict, universal: bool = False
) -> tuple[LoopState, dict] | None:
    """Resume from `latest` if there is one; checks the format and the parallel layout.
    With `universal`, reads the converted copy (a new data-parallel size)."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    source = universal_dir(run_dir) if universal else checkpoint_dir(run_dir)
    path, client = engine.load_checkpoint(str(source), tag=tag)
    if path is None:
        raise CheckpointError(f"{checkpoint_dir(run_dir) / tag} could not be loaded")
    if client.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {client.get('format_version')}, this dlm reads "
            f"{FORMAT_VERSION}; start a new run directory"
        )
    saved = client["layout"]
    if (saved["tensor"], saved["pipeline"]) != (layout["tensor"], layout["pipeline"]):
        raise CheckpointError(
            f"{path} was saved with tensor={saved['tensor']} pipeline={saved['pipeline']}; "
            f"this run uses tensor={layout['tensor']} pipeline={layout['pipeline']}. Resume with "
            "the same tensor and pipeline sizes (the data-parallel size may change)"
        )
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


def load_weights(module, run_dir: str | Path) -> None:
    """The parameters of the latest checkpoint, whatever tensor and pipeline sizes saved them,
    into a PipelineModule of this process's layout (sampling, export): each layer's tensor
    shards are joined along megatron's partition_dim and cut again for this layout. A resumed
    training run needs its saved tensor and pipeline sizes instead (optimizer shards)."""
    folder = checkpoint_dir(run_dir) / latest_tag(run_dir)
    for index, layer in enumerate(module.forward_funcs):
        files = module.ckpt_layer_path_list(str(folder), index)  # one per saved tensor rank
        if not files:
            raise CheckpointError(f"{folder} holds no parameters for layer {index}")
        saved = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
        state = {}
        for name, tensor in layer.state_dict(keep_vars=True).items():
            state[name] = _reshard(tensor, [shard[name] for shard in saved])
        layer.load_state_dict(state)


def _reshard(param: torch.Tensor, shards: list[torch.Tensor]) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return shards[0]  # replicated over the tensor group
    full = torch.cat(shards, param.partition_dim)
    group = parallel_state.get_tensor_model_parallel_group()
    return full.chunk(group.size(), param.partition_dim)[group.rank()]
