"""Atomic DeepSpeed checkpoints with the loop state, and automatic resume (STYLE.md §13).

A save goes to RUN/checkpoints/.incomplete-TAG first (every rank writes its shards there),
is renamed to RUN/checkpoints/TAG once all ranks are done, and only then does `latest` name
it (written to a temporary file and renamed). A kill at any moment leaves `latest` pointing
at a complete checkpoint; leftovers of an interrupted save are removed on the next start.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dlm_errors import CheckpointError

FORMAT_VERSION = 1
LATEST = "latest"


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
        "rng": torch.get_rng_state(),
        **extra,
    }
    engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging / tag, final)
        shutil.rmtree(staging, ignore_errors=True)
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(tag)
        os.replace(tmp, root / LATEST)
    dist.barrier()
    return tag


def load(engine, run_dir: str | Path, layout: dict) -> tuple[LoopState, dict] | None:
    """Resume from `latest` if there is one; checks the format and the parallel layout."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
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
    torch.set_rng_state(client["rng"])
    return LoopState(**client["loop"]), client


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
