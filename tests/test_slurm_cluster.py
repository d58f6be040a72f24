"""The test Slurm cluster itself, and the Slurm behaviour the sweep launcher's batch scripts rely
on: a requeued job reruns under its id with SLURM_RESTART_COUNT set, a requeue signals every
process of the job, and `scancel --batch` signals the batch shell alone."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, slurm_cluster_fixture, wait_for_lines  # noqa: F401

pytestmark = pytest.mark.slow


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -eu\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def test_job_runs_and_completes(slurm_cluster: SlurmCluster, tmp_path: Path):
    script = write_script(tmp_path / "hello.sh", 'echo "$SLURM_JOB_ID $1" > "$2"\n')
    job_id = slurm_cluster.submit(script, args=["hello", str(tmp_path / "out.txt")])
    assert slurm_cluster.wait(job_id, "COMPLETED", timeout_s=30) == "COMPLETED"
    assert (tmp_path / "out.txt").read_text() == f"{job_id} hello\n"
    assert slurm_cluster.restart_count(job_id) == 0


def test_requeued_job_reruns_with_restart_count(slurm_cluster: SlurmCluster, tmp_path: Path):
    """The first run blocks until it is requeued; the rerun (same id) sees SLURM_RESTART_COUNT=1
    and finishes, appending to the first run's output. A requeue that did nothing would let the
    first run complete after 60 s with Restarts=0."""
    runs = tmp_path / "runs.txt"
    script = write_script(
        tmp_path / "preemptible.sh",
        """\
        echo "${SLURM_RESTART_COUNT:-unset}" >> "$1"
        echo "run ${SLURM_RESTART_COUNT:-0}"
        if [ -z "${SLURM_RESTART_COUNT:-}" ]; then sleep 60; fi
        """,
    )
    # Without --open-mode=append the rerun truncates the job's output file (JobFileAppend=0).
    job_id = slurm_cluster.submit(script, "--open-mode=append", args=[str(runs)])
    slurm_cluster.wait(job_id, "RUNNING", timeout_s=30)
    wait_for_lines(runs, 1, timeout_s=10)
    slurm_cluster.requeue(job_id)
    # KillWait does not apply (the shell dies on SIGTERM); the rerun waits cred_expire (10 s).
    assert slurm_cluster.wait(job_id, "COMPLETED", timeout_s=40) == "COMPLETED"
    assert slurm_cluster.restart_count(job_id) == 1
    assert runs.read_text() == "unset\n1\n"  # the first run has no SLURM_RESTART_COUNT at all
    first, notice, rerun = (tmp_path / f"slurm-{job_id}.out").read_text().splitlines()
    assert (first, rerun) == ("run 0", "run 1")
    assert "DUE TO JOB REQUEUE" in notice  # slurmstepd's line, between the runs


def test_requeue_signals_children_in_their_own_session(slurm_cluster: SlurmCluster, tmp_path):
    """SIGTERM reaches the batch shell and a child started with setsid alike: proctrack tracks
    the job's processes by ancestry (linuxproc here, cgroup on most clusters), not by process
    group or session (proctrack/pgid would miss the setsid child)."""
    heard = tmp_path / "heard.txt"
    script = write_script(
        tmp_path / "tree.sh",
        """\
        trap 'echo batch >> "$1"; exit 0' TERM
        setsid bash -c 'trap "echo setsid >> $0; exit 0" TERM; echo started >> $0
                        while sleep 0.1; do :; done' "$1" &
        wait
        """,
    )
    job_id = slurm_cluster.submit(script, args=[str(heard)])
    wait_for_lines(heard, 1, timeout_s=30)
    slurm_cluster.requeue(job_id)
    lines = wait_for_lines(heard, 3, timeout_s=10)
    slurm_cluster.slurm("scancel", str(job_id))  # not worth waiting cred_expire for the rerun
    assert sorted(lines) == ["batch", "setsid", "started"]


def test_scancel_batch_signals_the_batch_shell_only(slurm_cluster: SlurmCluster, tmp_path):
    """`scancel --signal=USR1 --batch` stands in for `sbatch --signal=B:USR1@T`, which Slurm
    checks only every ~30 s: the batch shell's trap runs, its child hears nothing (the trap
    gives the child a second to tell). The shell ends the child itself: proctrack/linuxproc
    loses the processes whose parent has exited, so an orphan would outlive the job."""
    heard = tmp_path / "heard.txt"
    script = write_script(
        tmp_path / "usr1.sh",
        """\
        bash -c 'trap "echo child >> $0" USR1; echo started >> $0
                 while sleep 0.1; do :; done' "$1" &
        child=$!
        trap 'echo batch >> "$1"; sleep 1; kill $child; exit 0' USR1
        wait
        """,
    )
    job_id = slurm_cluster.submit(script, args=[str(heard)])
    wait_for_lines(heard, 1, timeout_s=30)
    slurm_cluster.slurm("scancel", "--signal=USR1", "--batch", str(job_id))
    assert slurm_cluster.wait(job_id, "COMPLETED", timeout_s=20) == "COMPLETED"
    assert heard.read_text() == "started\nbatch\n"
