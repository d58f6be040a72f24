"""The test Slurm cluster itself: a job runs to completion, and a requeued job reruns under the
same id with SLURM_RESTART_COUNT set (what the sweep launcher's preemption handling relies on)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, slurm_cluster_fixture, wait_for_file  # noqa: F401

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
    wait_for_file(runs, timeout_s=10)
    slurm_cluster.requeue(job_id)
    # KillWait does not apply (the shell dies on SIGTERM); the rerun waits cred_expire (10 s).
    assert slurm_cluster.wait(job_id, "COMPLETED", timeout_s=40) == "COMPLETED"
    assert slurm_cluster.restart_count(job_id) == 1
    assert runs.read_text() == "unset\n1\n"
    first, notice, rerun = (tmp_path / f"slurm-{job_id}.out").read_text().splitlines()
    assert (first, rerun) == ("run 0", "run 1")
    assert "DUE TO JOB REQUEUE" in notice  # slurmstepd's line, between the runs
