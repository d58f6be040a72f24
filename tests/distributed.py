"""Run a function in N processes joined by a gloo process group, on a free port; the
torchrun command of a training run."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp
from dlm_pretrain.launch.sweep.runner import free_port


def _free_port() -> int:
    return free_port()  # below the ephemeral range: no other test's connection takes it


def torchrun_command(nproc: int, *args: str) -> list[str]:
    """`torchrun --nproc-per-node N -m dlm_pretrain.launch.train ARGS` on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(_free_port()),
        "-m",
        "dlm_pretrain.launch.train",
        *args,
    ]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args, backend: str = "gloo") -> None:
    """Call fn(rank, world_size, *args) on each rank of a gloo group (or `backend`).

    A failure re-raises here with the failing rank and its traceback (torch's
    ProcessRaisedException names the process). fn must be a module-level function.
    """
    mp.start_processes(
        _entry,
        args=(world_size, _free_port(), fn, args, backend),
        nprocs=world_size,
        start_method="spawn",
    )
