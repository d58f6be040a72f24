"""A real single-node Slurm cluster for tests: munged, slurmctld and slurmd run from a private
temporary directory on free ports, so tests submit, requeue and watch real batch jobs.

A test module imports `slurm_cluster_fixture` (pytest registers it as the fixture
`slurm_cluster`) and takes a `slurm_cluster` argument. Missing Debian packages are installed;
without root or apt-get the test is skipped.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

# `slurmctld slurmd` alone pull in the rest (slurm-client, munge, slurm-wlm-basic-plugins:
# 8 packages); they are named for clarity. The `slurm-wlm` meta-package adds ~35 more.
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")
# Non-root PATHs often lack the sbin directories where Debian puts the daemons.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
PARTITION = "debug"
START_TIMEOUT_S = 60
KILL_WAIT_S = 10
# States a job does not leave (a requeued job passes through COMPLETING back to PENDING).
FINAL_STATES = frozenset(
    "COMPLETED FAILED CANCELLED TIMEOUT NODE_FAIL OUT_OF_MEMORY BOOT_FAIL DEADLINE".split()
)


def _run(cmd: Sequence[str], timeout_s: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, **kwargs)


def ensure_slurm_installed() -> dict[str, str]:
    """Absolute paths of the Slurm and munge programs, installing the packages when missing.

    Skips the test without root (the daemons run as root, and so does apt-get) or apt-get;
    a failed install is an error, since CI machines are expected to install."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster needs root (its daemons run as root)")
    if all(shutil.which(p, path=SEARCH_PATH) for p in PROGRAMS):
        return {p: shutil.which(p, path=SEARCH_PATH) for p in PROGRAMS}
    if shutil.which("apt-get") is None:
        pytest.skip(f"Slurm is not installed and there is no apt-get to install {PACKAGES}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
    ):
        start_s = time.monotonic()
        result = _run(cmd, timeout_s=600, env=env)
        if result.returncode:
            pytest.fail(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        log.info("%s: %.0f s", " ".join(cmd), time.monotonic() - start_s)
    missing = [p for p in PROGRAMS if shutil.which(p, path=SEARCH_PATH) is None]
    if missing:
        pytest.fail(f"installed {PACKAGES} but {missing} are still not found on {SEARCH_PATH}")
    return {p: shutil.which(p, path=SEARCH_PATH) for p in PROGRAMS}


def wait_for_lines(path: Path, n: int, timeout_s: float) -> list[str]:
    """Poll until a job has written at least n lines to `path`; its lines."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = path.read_text() if path.exists() else ""
        if text.count("\n") >= n:
            return text.splitlines()
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has {text!r}, not {n} lines, after {timeout_s:.0f} s")
        time.sleep(0.1)


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (all sockets are held open until every port is chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _memory_mib() -> int:
    with open("/proc/meminfo") as f:
        total_kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    return total_kib // 1024


def slurm_conf(root: Path, hostname: str, ports: Sequence[int], munge_socket: Path) -> str:
    """The single-node configuration; each choice that differs from the defaults says why."""
    ctld_port, slurmd_port = ports
    return f"""\
ClusterName=dlmtest
# The node is reached at 127.0.0.1 whatever the container calls itself.
SlurmctldHost={hostname}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s, beyond any test).
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (containers rarely let Slurm manage them): track a job's processes by parentage.
# Unlike proctrack/cgroup, this loses a process whose parent exited (it is never killed);
# unlike proctrack/pgid, it finds children in other process groups and sessions.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# A requeued job becomes eligible without an event that wakes the scheduler: poll every second
# (defaults: 60 s main loop, 30 s backfill).
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
ReturnToService=2
KillWait={KILL_WAIT_S}
# Finished jobs stay visible to `scontrol show job` for the whole session (no sacct here).
MinJobAge=3600
# Half the memory: a node that claims more than it has is drained.
NodeName={hostname} NodeAddr=127.0.0.1 CPUs={len(os.sched_getaffinity(0))} \
RealMemory={_memory_mib() // 2} State=UNKNOWN
PartitionName={PARTITION} Nodes={hostname} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """A running cluster: `env` (SLURM_CONF included) for any Slurm command, and helpers for
    the job life cycle that tests need."""

    root: Path
    env: dict[str, str]
    programs: dict[str, str]
    partition: str = PARTITION
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def slurm(self, program: str, *args: str, timeout_s: float = 30) -> str:
        """Run a Slurm command against this cluster; its stdout, or an error with stderr."""
        cmd = [self.programs.get(program, program), *args]
        result = _run(cmd, timeout_s=timeout_s, env=self.env)
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def submit(self, script: Path, *options: str, args: Sequence[str] = ()) -> int:
        """`sbatch OPTIONS SCRIPT ARGS` from the script's directory (slurm-JOBID.out lands
        there unless --output says otherwise); the job id."""
        out = self.slurm(
            "sbatch", "--parsable", f"--chdir={script.parent}", *options, str(script), *args
        )
        return int(out.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as key -> value (values with spaces are cut at the first)."""
        out = self.slurm("scontrol", "--oneliner", "show", "job", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def job_state(self, job_id: int) -> str:
        """PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... (a
        requeued job shows COMPLETING, then PENDING with Reason=BeginTime)."""
        return self.job_info(job_id)["JobState"]

    def restart_count(self, job_id: int) -> int:
        """How often the job was requeued (the rerun sees it as SLURM_RESTART_COUNT)."""
        return int(self.job_info(job_id)["Restarts"])

    def requeue(self, job_id: int) -> None:
        self.slurm("scontrol", "requeue", str(job_id))

    def wait(self, job_id: int, states: Sequence[str] | str, timeout_s: float) -> str:
        """Poll until the job is in one of `states` and return it; a final state that was not
        asked for, or the timeout, raises with the job's record and the daemon logs."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            if state in FINAL_STATES or time.monotonic() > deadline:
                why = f"ended {state}" if state in FINAL_STATES else f"still {state}"
                raise AssertionError(
                    f"job {job_id} {why} after waiting for {sorted(wanted)} (at most "
                    f"{timeout_s:.0f} s):\n{self.job_info(job_id)}\n{self.logs()}"
                )
            time.sleep(0.2)

    def logs(self, tail_chars: int = 3000) -> str:
        """The end of each daemon's log, for error messages; the stderr of a daemon that
        exited too, since it may have died before opening its log."""
        paths = sorted((self.root / "log").glob("*.log"))
        paths += [
            self.root / "log" / f"{name}.stderr"
            for name, proc in self.daemons.items()
            if proc.poll() is not None and (self.root / "log" / f"{name}.stderr").exists()
        ]
        return "\n".join(
            f"--- {path.name} ---\n{path.read_text(errors='replace')[-tail_chars:]}"
            for path in paths
        )

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (slurmstepd outlives slurmd, so jobs go
        first); logs and job outputs stay on disk."""
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            try:
                self.slurm("scancel", f"--partition={self.partition}", timeout_s=10)
                self._wait_no_jobs(timeout_s=KILL_WAIT_S + 5)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                log.warning("could not cancel the remaining jobs: %s", e)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.daemons.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def _wait_no_jobs(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.slurm("squeue", "--noheader", "--format=%i %T").strip():  # unfinished jobs
            if time.monotonic() > deadline:
                return
            time.sleep(0.5)

    def _wait_idle(self, hostname: str) -> None:
        """Until sinfo shows the node idle; a daemon that dies or the timeout raises with the
        daemon logs."""
        deadline = time.monotonic() + START_TIMEOUT_S
        state = ""
        while state != "idle":
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited ({proc.returncode}) during start:\n{self.logs()}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"node {hostname} is {state or 'unknown'}, not idle, after "
                    f"{START_TIMEOUT_S} s:\n{self.logs()}"
                )
            time.sleep(0.5)
            result = _run(
                [self.programs["sinfo"], "--noheader", "--Node", "--format=%t"],
                timeout_s=10,
                env=self.env,
            )
            state = result.stdout.strip()


def _start_munged(root: Path, munged: str) -> tuple[subprocess.Popen, Path]:
    """A private munged with its own key, socket, pid and log, beside any system one."""
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o700)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = munge_dir / "munge.socket"
    cmd = [
        munged,
        "--foreground",
        "--force",
        f"--socket={sock}",
        f"--key-file={key}",
        f"--pid-file={munge_dir}/munged.pid",
        f"--seed-file={munge_dir}/munged.seed",
    ]
    # In the foreground munged logs to stderr (--log-file is ignored).
    with open(root / "log" / "munged.log", "w") as log_file:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stderr=log_file, start_new_session=True
        )
    return proc, sock


@contextmanager
def start_cluster(root: Path) -> Iterator[SlurmCluster]:
    """Configure and start the cluster in `root`; stops every daemon on exit."""
    programs = ensure_slurm_installed()
    hostname = socket.gethostname().split(".")[0]
    for sub in ("log", "state", "spool"):
        (root / sub).mkdir(parents=True)
    conf = root / "slurm.conf"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(root=root, env=env, programs=programs)
    try:
        cluster.daemons["munged"], munge_socket = _start_munged(root, programs["munged"])
        conf.write_text(slurm_conf(root, hostname, _free_ports(2), munge_socket))
        deadline = time.monotonic() + 10
        while not munge_socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged made no socket within 10 s:\n{cluster.logs()}")
            time.sleep(0.1)
        # -D: in the foreground, so each daemon is our child; -N: slurmd need not work out
        # which node it is from the hostname.
        for daemon, extra in (("slurmctld", []), ("slurmd", ["-N", hostname])):
            with open(root / "log" / f"{daemon}.stderr", "w") as stderr:
                cluster.daemons[daemon] = subprocess.Popen(
                    [programs[daemon], "-D", "-f", str(conf), *extra],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                )
        cluster._wait_idle(hostname)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One cluster per test session (starting takes a second or two, installing ~15 s)."""
    with start_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
