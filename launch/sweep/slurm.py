"""The `slurm` backend: one batch job per run, each running `dlm sweep run` for its run.

A job is requeued rather than lost: `--requeue` lets Slurm put a preempted job back in the
queue, and `--signal=B:USR1@T` warns the job's shell (the `dlm sweep run` process, which the
script `exec`s) T seconds before the time limit; it passes the warning to the workers, which
save and exit 0, and requeues its own job when the run is not done (runner.run_one). Either
way the job starts again from the run's latest checkpoint. A job that Slurm preempts or that
an admin requeues gets SIGTERM in every process, and the trainer saves on it too."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from dlm_pretrain.launch.sweep.config import SweepConfig
from dlm_pretrain.launch.sweep.plan import PlannedRun
from dlm_pretrain.launch.sweep.runner import is_done, parent_run_id

JOB_ID_FILE = "slurm_job_id"  # in the run directory: the job that trains it
_ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "RESV_DEL_HOLD",
}
_COMMAND_TIMEOUT_S = 60
_WAIT_POLL_S = 2.0


def batch_script(sweep_file: Path, sweep: SweepConfig, run: PlannedRun) -> str:
    slurm = sweep.backend.slurm
    options = [
        f"--job-name={sweep.name}-{run.name}",
        f"--output={run.run_dir.resolve()}/slurm-%j.out",
        "--open-mode=append",  # a requeued job continues its log
        "--requeue",
        "--nodes=1",
        "--ntasks=1",  # the deepspeed launcher, which starts backend.nproc workers
        f"--cpus-per-task={max(1, sweep.backend.nproc)}",
        f"--time={slurm.time}",
        f"--signal=B:USR1@{slurm.signal_seconds}",
    ]
    options += [f"--partition={slurm.partition}"] if slurm.partition else []
    options += [f"--gpus-per-node={slurm.gpus_per_node}"] if slurm.gpus_per_node else []
    options += list(slurm.sbatch)
    command = [sys.executable, "-m", "dlm_pretrain.launch.cli", "sweep", "run"]
    command += [str(sweep_file), "--run", run.name]
    lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in options)]
    lines += [f"cd {shlex.quote(str(Path.cwd()))}", "exec " + shlex.join(command), ""]
    return "\n".join(lines)


def job_state(job_id: str) -> str | None:
    """The job's state while Slurm still lists it in the queue, else None."""
    result = subprocess.run(
        ["squeue", "--noheader", "--jobs", job_id, "--format=%T"],
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT_S,
    )
    state = result.stdout.strip()
    return state if result.returncode == 0 and state else None


def queued_job(run: PlannedRun) -> str | None:
    """The run's job if it is still queued or running."""
    id_file = run.run_dir / JOB_ID_FILE
    if not id_file.is_file():
        return None
    job_id = id_file.read_text().strip()
    return job_id if job_state(job_id) in _ACTIVE else None


def submit(sweep_file: Path, sweep: SweepConfig, run: PlannedRun) -> str:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    script = run.run_dir / "job.sbatch"
    script.write_text(batch_script(sweep_file, sweep, run))
    result = subprocess.run(
        ["sbatch", "--parsable", str(script)],
        capture_output=True,
        text=True,
        timeout=_COMMAND_TIMEOUT_S,
    )
    if result.returncode:
        raise RuntimeError(f"sbatch {script} failed: {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    (run.run_dir / JOB_ID_FILE).write_text(job_id)
    return job_id


def launch_slurm(sweep_file: Path, sweep: SweepConfig, runs: list[PlannedRun], wait: bool) -> int:
    """Submit a job for every run that is neither done nor queued; with `wait`, return when
    none of the sweep's jobs is left in the queue (0 if every run is then done)."""
    parent_run_id(sweep)  # before the jobs start side by side
    jobs = {}
    for run in runs:
        if is_done(run):
            print(f"{run.name}: done, skipped")
        elif job := queued_job(run):
            print(f"{run.name}: job {job} is {job_state(job)}, left as it is")
            jobs[run.name] = job
        else:
            jobs[run.name] = submit(sweep_file, sweep, run)
            print(f"{run.name}: submitted job {jobs[run.name]}")
    if not wait:
        print("`dlm sweep status` follows them; `squeue --me` lists the jobs")
        return 0
    return _wait(runs, jobs)


def _wait(runs: list[PlannedRun], jobs: dict[str, str]) -> int:
    """Poll the queue until every job has left it, printing each change of state."""
    states: dict[str, str | None] = {}
    while True:
        current = {name: job_state(job) for name, job in jobs.items()}
        for name, state in current.items():
            if state != states.get(name, "?"):
                print(f"{name}: job {jobs[name]} {state or 'left the queue'}", flush=True)
        states = current
        if not any(current.values()):
            break
        time.sleep(_WAIT_POLL_S)
    unfinished = [run.name for run in runs if not is_done(run)]
    if unfinished:
        print(f"not done: {', '.join(unfinished)}; see their slurm-*.out, then launch again")
        return 1
    return 0
