"""`dlm sweep launch` and `dlm sweep run`: every planned run through the deepspeed launcher,
until each has trained all its steps.

`dlm sweep run SWEEP --run NAME` trains one run to the end (or to a stop signal: the workers
save and exit 0) and is what every backend starts: `local` starts it as a child process,
`concurrent` at a time on disjoint devices and free rendezvous ports; `hostfile` starts it once per
run across the hostfile's nodes; `slurm` puts it in one batch job per run (launch.sweep.slurm).
A run whose checkpoint has reached its planned steps is done and skipped; any other resumes
from its checkpoint, so launching again after a stop, a crash or a preemption finishes the
sweep."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.launch.launcher import (
    deepspeed_command,
    handles_signal,
    hostfile_slots,
    run_deepspeed,
)
from dlm_pretrain.launch.sweep.config import SweepConfig, tracking_target
from dlm_pretrain.launch.sweep.plan import PlannedRun
from dlm_pretrain.pretrain.checkpoint_files import saved_meta
from dlm_pretrain.pretrain.tracking import sweep_parent_run

log = logging.getLogger(__name__)

PARENT_ID_FILE = "mlflow_parent_run_id"
_POLL_S = 0.5
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def trained_steps(run: PlannedRun) -> int:
    """The step of the run's latest checkpoint (0: not started)."""
    meta = saved_meta(run.run_dir)
    return meta["step"] if meta else 0


def is_done(run: PlannedRun) -> bool:
    return trained_steps(run) >= run.steps


def parent_run_id(sweep: SweepConfig) -> str:
    """The sweep's MLflow parent run, created on first use."""
    uri, experiment = tracking_target(sweep)
    runs_dir = Path(sweep.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    tags = {"objectives": ",".join(sweep.objectives), "sizes": ",".join(sweep.sizes)}
    return sweep_parent_run(uri, experiment, sweep.name, runs_dir / PARENT_ID_FILE, tags)


def run_settings(sweep: SweepConfig, run: PlannedRun, parent_id: str) -> list[str]:
    """The run's `dlm train` settings, with its place in MLflow: a child of the sweep's
    parent run, tagged with what the sweep knows of it."""
    uri, experiment = tracking_target(sweep)
    tags = {
        "sweep": sweep.name,
        "objective": run.objective,
        "size": run.size,
        "parameters": str(run.non_embedding),
        "parameters_total": str(run.parameters),
        "budget": repr(run.budget),
        "convention": run.convention,
        "flops": repr(run.flops),
        "steps": str(run.steps),
    }
    return [
        *run.settings,
        f"tracking.uri={uri}",
        f"tracking.experiment={experiment}",
        f"tracking.parent_run_id={parent_id}",
        f"tracking.tags={json.dumps(tags)}",
    ]


def run_one(sweep: SweepConfig, run: PlannedRun, devices: list[int]) -> int:
    """Train one run to its end or to a stop signal; returns the launcher's exit code. In a
    Slurm job, a run stopped before its end (preemption, the time limit's warning) requeues
    its job, which resumes from the checkpoint just saved."""
    backend = sweep.backend
    hostfile = backend.hostfile if backend.kind == "hostfile" else None
    hosts = len(hostfile_slots(hostfile)) if hostfile else 1
    settings = run_settings(sweep, run, parent_run_id(sweep))
    nproc = None if hostfile else backend.nproc
    port = None if hostfile else free_port()  # runs side by side, other jobs on the node
    command = deepspeed_command(
        None, settings, nproc, hostfile, hosts, master_port=port, devices=devices
    )
    print("+ " + " ".join(command), flush=True)
    code = run_deepspeed(command, hosts)
    if code == 0 and not is_done(run) and "SLURM_JOB_ID" in os.environ:
        job = os.environ["SLURM_JOB_ID"]
        print(f"{run.name} stopped at step {trained_steps(run)}: requeueing job {job}", flush=True)
        # Slurm may be requeueing it already (a preemption's SIGTERM), which this call refuses
        subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
    return code


def launch_local(sweep_path: Path, sweep: SweepConfig, runs: list[PlannedRun]) -> int:
    """Every run not done yet, `backend.concurrent` at a time (1 for a hostfile), each as a
    `dlm sweep run` child. A stop signal is passed to the running children, which save and
    exit; no new run starts after it. Returns 0 when every run is done."""
    pending = [run for run in runs if not is_done(run)]
    for run in runs:
        if run not in pending:
            print(f"{run.name}: done ({run.steps} steps), skipped")
    concurrent = 1 if sweep.backend.kind == "hostfile" else sweep.backend.concurrent
    devices = device_slots(sweep.backend.nproc, concurrent)
    progress = _Progress(len(pending), sum(run.flops for run in pending))
    running: dict[int, tuple[PlannedRun, subprocess.Popen, Path]] = {}
    signals: list[int] = []
    sent: dict[int, int] = {}  # child pid -> signals passed on
    failed: list[str] = []

    def remember(sig: int, frame) -> None:
        signals.append(sig)

    previous = {sig: signal.signal(sig, remember) for sig in _STOP_SIGNALS}
    try:
        while (pending and not signals) or running:
            for slot in range(concurrent):
                if slot not in running and pending and not signals:
                    run = pending.pop(0)
                    nproc = sweep.backend.nproc
                    running[slot] = _start(sweep_path, run, devices[slot], concurrent, nproc)
                    print(f"{progress.line()} started {run.name} (slot {slot})", flush=True)
            _pass_on(signals, running, sent)
            for slot, (run, child, output) in list(running.items()):
                if child.poll() is None:
                    continue
                del running[slot]
                state = "done" if is_done(run) else f"stopped at step {trained_steps(run)}"
                if child.returncode and not signals:
                    failed.append(run.name)
                    state = f"failed (exit {child.returncode}; log {output})"
                progress.finished(run)
                print(f"{progress.line()} {run.name}: {state}; {progress.eta()}", flush=True)
            time.sleep(_POLL_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        print(f"failed runs: {', '.join(failed)}; fix them and launch again (done runs skip)")
        return 1
    if signals:
        print("stopped; launch again to resume the unfinished runs")
        return 128 + signals[0]
    return 0


class _Progress:
    """Runs ended out of the runs to train, and the ETA from the FLOPs trained so far."""

    def __init__(self, runs: int, flops: float) -> None:
        self.runs, self.flops = runs, flops
        self.ended, self.flops_ended, self.start = 0, 0.0, time.monotonic()

    def finished(self, run: PlannedRun) -> None:
        self.ended += 1
        self.flops_ended += run.flops

    def line(self) -> str:
        return f"[{self.ended}/{self.runs}]"

    def eta(self) -> str:
        elapsed = time.monotonic() - self.start
        text = f"elapsed {elapsed / 60:.1f} min"
        if self.flops_ended:
            left = elapsed / self.flops_ended * (self.flops - self.flops_ended)
            text += f", ETA {left / 60:.1f} min"
        return text


def free_port() -> int:
    """A TCP port free on this machine now, for a run's rendezvous: drawn below the kernel's
    ephemeral range, which it hands to outgoing connections (another run's gloo links) and to
    bind(0), so that nothing takes it before the launcher listens there."""
    low = _ephemeral_low()
    ports = random.sample(range(PORT_FLOOR, low), k=64) if low - PORT_FLOOR >= 64 else []
    for port in [*ports, 0]:  # 0: the kernel's choice, where no range lies below
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError("no free TCP port for a run's rendezvous")


PORT_FLOOR = 20_000  # rendezvous ports are drawn from here to the ephemeral range's start


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def device_slots(nproc: int, concurrent: int) -> list[list[int]]:
    """The GPUs of each slot, disjoint (none on a CPU machine, where runs share the cores)."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        return [[] for _ in range(concurrent)]
    if nproc * concurrent > gpus:
        raise ConfigError(
            f"backend.concurrent={concurrent} runs x backend.nproc={nproc} need "
            f"{nproc * concurrent} GPUs, this machine has {gpus}; lower one of them"
        )
    return [list(range(k * nproc, (k + 1) * nproc)) for k in range(concurrent)]


def _start(
    sweep_path: Path, run: PlannedRun, devices: list[int], concurrent: int, nproc: int
) -> tuple[PlannedRun, subprocess.Popen, Path]:
    """A `dlm sweep run` child in its own session (signals reach it through this process
    only); with several at a time each writes to RUN_DIR/launch.log instead of the terminal."""
    command = [sys.executable, "-m", "dlm_pretrain.launch.cli", "sweep", "run", str(sweep_path)]
    command += ["--run", run.name]
    command += ["--devices", ",".join(map(str, devices))] if devices else []
    run.run_dir.mkdir(parents=True, exist_ok=True)
    output = run.run_dir / "launch.log"
    stream = open(output, "a") if concurrent > 1 else None  # noqa: SIM115 (the child's)
    child = subprocess.Popen(
        command,
        stdout=stream,
        stderr=subprocess.STDOUT if stream else None,
        start_new_session=True,
        env=None if devices else _thread_share(concurrent * nproc),
    )
    if stream:
        stream.close()
    return run, child, output


def _thread_share(processes: int) -> dict[str, str]:
    """On CPU, runs side by side split the cores rather than each taking all of them (torch's
    default), which slows every one of them many times over; a value the user set wins."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return env


def _pass_on(signals: list[int], running: dict, sent: dict[int, int]) -> None:
    """Each signal received, to each child once it can take it (before its handler is
    installed a signal would kill it and orphan its launcher)."""
    for _, child, _ in running.values():
        count = sent.get(child.pid, 0)
        while count < len(signals) and child.poll() is None:
            if not handles_signal(child.pid, signals[count]):
                break
            os.kill(child.pid, signals[count])
            count += 1
        sent[child.pid] = count
