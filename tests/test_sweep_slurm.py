"""The `slurm` backend on a real single-node Slurm cluster (tests/slurm_cluster.py): a sweep
whose job is requeued mid-run finishes with the losses of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dlm_pretrain.launch.sweep.config import load_sweep
from dlm_pretrain.launch.sweep.plan import plan_sweep
from dlm_pretrain.launch.sweep.slurm import JOB_ID_FILE
from slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401

pytestmark = pytest.mark.slow

SETTINGS = {
    "train.global_batch": 8,
    "train.micro_batch": 4,
    "train.checkpoint_every": 3,
    "train.val_every": 1000,
    "train.val_sequences": 8,
    "data.num_workers": 1,  # a loader worker, which the requeue's SIGTERM reaches too
}


def _losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a step logged again after a resume keeps its last value."""
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


def _dlm(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dlm_pretrain.launch.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def test_a_requeued_slurm_job_resumes_and_matches_an_uninterrupted_run(
    slurm_cluster: SlurmCluster, dataset: Path, tmp_path: Path
):
    """Two runs, a job each, side by side on the node's two CPUs. One is requeued (SIGTERM to
    every process of the job, SIGKILL 10 s later) after its first checkpoint: its trainer
    saves, Slurm starts the same job again, and it resumes. Both runs end with every step's
    loss equal to the same run trained in one go outside Slurm."""
    sweep_file = tmp_path / "sweep.yaml"
    tree = {
        "name": "slurm-test",
        "runs_dir": str(tmp_path / "runs"),
        "objectives": ["ar", "mdlm"],
        "sizes": ["micro"],
        "budgets": [3e9],
        "settings": {"data.path": str(dataset), **SETTINGS},
        "checks": {"min_steps": 10},
        "backend": {"kind": "slurm", "slurm": {"time": "00:20:00", "signal_seconds": 60}},
    }
    sweep_file.write_text(yaml.safe_dump(tree))
    env = {**slurm_cluster.env, "OMP_NUM_THREADS": "1"}
    submitted = _dlm(env, tmp_path, "sweep", "launch", str(sweep_file))
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    ar, mdlm = plan_sweep(load_sweep(sweep_file))
    job = int((mdlm.run_dir / JOB_ID_FILE).read_text())

    deadline = time.monotonic() + 240
    while not (mdlm.run_dir / "checkpoints" / "latest").is_file():
        assert time.monotonic() < deadline, f"no checkpoint\n{slurm_cluster.logs()}"
        time.sleep(0.5)
    slurm_cluster.requeue(job)
    waited = _dlm(env, tmp_path, "sweep", "launch", "--wait", str(sweep_file))
    assert waited.returncode == 0, waited.stdout[-3000:] + waited.stderr[-3000:]
    assert slurm_cluster.restart_count(job) == 1
    assert slurm_cluster.job_state(job) == "COMPLETED"
    log = next(mdlm.run_dir.glob("slurm-*.out")).read_text()
    assert "DUE TO JOB REQUEUE" in log and "resumed from step" in log

    references = [(run, tmp_path / f"reference-{run.name}") for run in (ar, mdlm)]
    started = [_start_in_one_go(run, reference) for run, reference in references]
    for (run, reference), one_go in zip(references, started, strict=True):
        assert one_go.wait(timeout=300) == 0, reference.with_suffix(".log").read_text()[-3000:]
        assert _losses(run.run_dir) == _losses(reference)
        assert sorted(_losses(reference)) == list(range(1, run.steps + 1))


def _start_in_one_go(run, reference: Path) -> subprocess.Popen:
    """The run's own settings in a directory of its own, one process, outside Slurm (both
    references side by side, as the jobs ran)."""
    settings = [s for s in run.settings if not s.startswith("train.run_dir=")]
    command = [sys.executable, "-m", "dlm_pretrain.launch.train", *settings]
    with open(reference.with_suffix(".log"), "w") as log:
        return subprocess.Popen(
            [*command, f"train.run_dir={reference}"],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
