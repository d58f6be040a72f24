"""Process groups and the runtime: the only global state, set up in one place
(docs/conventions.md §9).

Rank layout, tensor fastest, then data, then pipeline: rank = tp + T*dp + T*D*pp. This is
megatron-core's order (tp-cp-ep-dp-pp with cp = ep = 1) and DeepSpeed's
PipeModelDataParallelTopology (pipe, data, model with model fastest); start-up checks that
both agree.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.parallel.config import ParallelConfig
from torch.distributed import ProcessGroup

log = logging.getLogger(__name__)
# DeepSpeed compiles its CPU shared-memory collectives on first use, in about a minute; a build
# lock older than this was left by a process killed during the build.
STALE_BUILD_LOCK_S = 600

# srun's tasks meet on a port derived from the job id, below Linux's ephemeral range
# (32768-60999) so that no outgoing connection holds it.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000


def environment_from_slurm() -> None:
    """`srun python -m dlm_pretrain.launch.train ...` starts every rank itself, with no launcher to
    set torch's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT: derive them from the
    task's SLURM variables (the rendezvous is the job's first host). Called once at process
    start, before Runtime.detect picks the GPU by LOCAL_RANK. Nothing changes when a
    launcher has set WORLD_SIZE, or outside an srun step (SLURM_STEP_ID unset: a batch
    script's own process is not one of the step's tasks, and SLURM_NTASKS there counts the
    tasks it has yet to start). MASTER_ADDR and MASTER_PORT already set are kept.
    """
    env = os.environ
    if "WORLD_SIZE" in env or "SLURM_STEP_ID" not in env:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env["SLURM_LOCALID"]
    env.setdefault("MASTER_ADDR", expand_nodelist(env["SLURM_JOB_NODELIST"])[0])
    port = SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % SLURM_PORT_SPAN
    env.setdefault("MASTER_PORT", str(port))


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, in order: "gpu[03-05,9],login1" -> gpu03, gpu04, gpu05,
    gpu9, login1 (zero padding kept; several bracket groups in one name multiply)."""
    names = re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist)  # split at commas outside [...]
    return [host for name in names for host in _expand_name(name)]


def _expand_name(name: str) -> list[str]:
    match = re.match(r"([^\[]*)\[([^\]]*)\](.*)", name)
    if match is None:
        return [name]
    prefix, ranges, rest = match.groups()
    hosts = []
    for part in ranges.split(","):
        first, _, last = part.partition("-")
        for i in range(int(first), int(last or first) + 1):
            hosts += [f"{prefix}{i:0{len(first)}d}{tail}" for tail in _expand_name(rest)]
    return hosts


@dataclass(frozen=True)
class Runtime:
    """Device, compute dtype and communication backend, decided once."""

    device: torch.device
    dtype: torch.dtype
    backend: str

    @classmethod
    def detect(cls, dtype: str | None = None) -> Runtime:
        """CUDA: nccl and bf16 autocast; otherwise cpu, gloo and float32 (or the dtype asked
        for). On CUDA this rank's device becomes the current one before anything is
        allocated, so NCCL, DeepSpeed and every `device="cuda"` land on GPU LOCAL_RANK."""
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            return cls(device, _dtype(dtype or "bfloat16"), "nccl")
        return cls(torch.device("cpu"), _dtype(dtype or "float32"), "gloo")


@dataclass(frozen=True)
class ProcessGroups:
    tp_group: ProcessGroup
    dp_group: ProcessGroup
    pp_group: ProcessGroup
    tp_rank: int
    dp_rank: int
    pp_rank: int
    tp_size: int
    dp_size: int
    pp_size: int
    topology: object  # deepspeed PipeModelDataParallelTopology


def init_process_groups(par: ParallelConfig, runtime: Runtime) -> ProcessGroups:
    """Join (or create, for a single process) the default group, then build both layouts."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state

    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:  # launched by deepspeed or torchrun
            dist.init_process_group(runtime.backend)
        else:  # a single process started without a launcher
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's PipelineModule reads it
            dist.init_process_group(runtime.backend, store=dist.HashStore(), rank=0, world_size=1)
    if runtime.device.type == "cpu":
        remove_stale_build_locks()
    deepspeed.init_distributed(runtime.backend)
    dp_size = par.data_parallel_size(dist.get_world_size())
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(par.tensor, par.pipeline)
    topology = PipeModelDataParallelTopology(num_pp=par.pipeline, num_mp=par.tensor, num_dp=dp_size)
    groups = ProcessGroups(
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        tp_size=par.tensor,
        dp_size=dp_size,
        pp_size=par.pipeline,
        topology=topology,
    )
    coord = topology.get_coord(dist.get_rank())
    if (coord.pipe, coord.data, coord.model) != (groups.pp_rank, groups.dp_rank, groups.tp_rank):
        raise RuntimeError(
            f"rank {dist.get_rank()}: megatron-core places it at pp={groups.pp_rank} "
            f"dp={groups.dp_rank} tp={groups.tp_rank}, DeepSpeed at {coord}"
        )
    return groups


def remove_stale_build_locks() -> None:
    """torch waits forever on the lock file of an extension build; one killed mid-build (a
    Ctrl-C during a first run) would hang every later run in deepspeed.init_distributed."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in [*root.glob("deepspeed_shm_comm/lock"), *root.glob("*/deepspeed_shm_comm/lock")]:
        if time.time() - lock.stat().st_mtime > STALE_BUILD_LOCK_S:
            log.warning("removing %s, left by a build that was killed", lock)
            lock.unlink(missing_ok=True)


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {list(dtypes)}")
    return dtypes[name]
