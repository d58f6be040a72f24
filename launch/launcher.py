"""`dlm train --nproc N` and `--hostfile FILE`: the deepspeed launcher, its world size, and
the signals that must reach the workers.

The deepspeed runner and its per-node launcher handle SIGINT and SIGTERM by killing the
workers (SIGTERM, 30 s, SIGKILL, exit 1) and do not handle SIGUSR1, SLURM's preemption
warning, at all: it kills them and leaves the workers running. So the runner starts in a
session of its own, out of reach of signals meant for dlm's process group, and dlm turns
SIGTERM, SIGUSR1, SIGINT and SIGHUP into SIGUSR1 for each worker. A worker then finishes
its step, saves and exits 0 (pretrain.trainer), every rank at the same step (the request
is all-reduced), the launchers see clean exits and dlm returns the runner's exit code.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
from dlm_pretrain.common.errors import ConfigError

log = logging.getLogger(__name__)

_POLL_S = 0.5  # how often dlm looks for workers ready to receive a pending stop
# SIGHUP: the terminal has closed, and with it the only way to stop the runner's session.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def hostfile_slots(path: str) -> dict[str, int]:
    """Processes per host of a deepspeed hostfile: `HOST slots=N` lines, `#` comments."""
    if not Path(path).is_file():
        raise ConfigError(f"--hostfile {path}: no such file")
    slots: dict[str, int] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"(\S+)\s+slots=(\d+)\s*(#.*)?$", line)
        if not match or match[1] in slots or int(match[2]) < 1:
            raise ConfigError(
                f"--hostfile {path}, line {number}: {line!r} is not `HOST slots=N` with N >= 1 "
                "and a host not listed before; write one such line per host"
            )
        slots[match[1]] = int(match[2])
    if not slots:
        raise ConfigError(f"--hostfile {path} lists no host; write one `HOST slots=N` per host")
    return slots


def world_size(slots: dict[str, int] | None, nproc: int | None) -> int:
    """Processes the launcher starts: --nproc (default 1) on this node, or each host's slots;
    with both, --nproc processes on every host (deepspeed's --num_gpus), at most its slots."""
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be at least 1")
    if slots is None:
        return nproc or 1
    if nproc is not None:
        full = {host: n for host, n in slots.items() if n < nproc}
        if full:
            raise ConfigError(
                f"--nproc {nproc} exceeds the hostfile's slots of {full}; use --nproc <= "
                f"{min(full.values())} or leave --nproc out to use every slot"
            )
        return nproc * len(slots)
    return sum(slots.values())


def deepspeed_command(
    preset: str | None,
    overrides: list[str],
    nproc: int | None,
    hostfile: str | None,
    hosts: int,
    master_port: int | None = None,
    devices: list[int] | None = None,
) -> list[str]:
    """The runner's command line. With a single host the runner launches on this machine
    without ssh, so its ssh probes are skipped and the rendezvous is local. Runs side by side
    on one machine (`dlm sweep launch`) each take their own rendezvous port and, on GPUs,
    their own `devices`."""
    command = ["deepspeed"]
    if hostfile:
        command += ["--hostfile", hostfile]
        command += ["--no_ssh_check", "--master_addr", "127.0.0.1"] if hosts == 1 else []
    if master_port is not None:
        command += ["--master_port", str(master_port)]
    if devices:
        command += ["--include", "localhost:" + ",".join(map(str, devices))]
    elif nproc is not None or not hostfile:
        command += ["--num_gpus", str(nproc or 1)]
    settings = [preset, *overrides] if preset else overrides
    return [*command, "--module", "dlm_pretrain.launch.train", *settings]


def run_deepspeed(command: list[str], hosts: int) -> int:
    """Run the deepspeed runner to the end and return its exit code.

    On one host, SIGTERM, SIGUSR1, SIGINT or SIGHUP asks every worker to save and stop; a
    signal dlm was started to ignore (nohup, `dlm train &` in a script) stays ignored. A
    request that arrives before a worker can handle it is kept and sent once its handler is
    installed. Repeating SIGTERM or SIGUSR1 changes nothing (SLURM follows its warning with
    SIGTERM, which must not cut a save short); a second SIGINT kills the run's processes at
    once, as Ctrl-C no longer reaches them.

    On several hosts pdsh starts every worker over ssh, out of dlm's reach: the runner stays
    in dlm's process group and handles SIGINT and SIGTERM itself (it kills the workers on
    every host, without a save). Preemptible multi-node jobs use srun (README).
    """
    if hosts > 1:
        return subprocess.call(command)
    signals: list[int] = []

    def remember(sig: int, frame) -> None:
        signals.append(sig)

    handled = [sig for sig in _STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, remember) for sig in handled}
    try:
        runner = subprocess.Popen(command, start_new_session=True)
        signalled: set[int] = set()  # workers asked to stop
        reported = 0  # signals announced
        while True:
            try:
                return runner.wait(timeout=_POLL_S)
            except subprocess.TimeoutExpired:
                pass
            if signals.count(signal.SIGINT) > 1:
                os.killpg(runner.pid, signal.SIGKILL)  # the runner's session: every process
                runner.wait()
                return 128 + signal.SIGINT
            if len(signals) > reported:
                reported = len(signals)
                name = signal.Signals(signals[-1]).name
                log.info("%s: the workers save after this step and exit; Ctrl-C twice kills", name)
            if signals:
                signalled |= _ask_workers_to_stop(runner.pid, signalled)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ask_workers_to_stop(runner_pid: int, signalled: set[int]) -> set[int]:
    """SIGUSR1 to each worker under the runner not signalled yet whose handler is installed
    (before that, SIGUSR1 would kill it); returns the pids signalled now."""
    sent = set()
    for pid in _workers(runner_pid) - signalled:
        try:
            if handles_signal(pid, signal.SIGUSR1):
                os.kill(pid, signal.SIGUSR1)
                sent.add(pid)
        except (FileNotFoundError, ProcessLookupError):  # it has just exited
            continue
    return sent


def _workers(runner_pid: int) -> set[int]:
    """The processes under the runner that run `-m dlm_pretrain.launch.train`, less the data loader
    workers forked from them (same command line, a worker as parent)."""
    train = {}  # pid -> parent pid
    try:
        for proc in psutil.Process(runner_pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if ("-m", "dlm_pretrain.launch.train") in itertools.pairwise(proc.cmdline()):
                    train[proc.pid] = proc.ppid()
    except psutil.NoSuchProcess:  # the runner has just exited
        return set()
    return {pid for pid, parent in train.items() if parent not in train}


def handles_signal(pid: int, sig: int) -> bool:
    """Whether the process has installed a handler for sig: bit sig-1 of SigCgt in
    /proc/PID/status (Linux, where the deepspeed launcher runs)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (sig - 1) & 1)
