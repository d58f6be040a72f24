"""Launchers: a signal to `dlm train --nproc N` reaches every worker, which saves and exits 0,
and leaves no process behind; a hostfile's slots set the world size; `srun` without a
launcher trains data parallel from SLURM's variables alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from distributed import _free_port
from dlm_pretrain.launch.cli import main
from dlm_pretrain.parallel.groups import environment_from_slurm, expand_nodelist
from test_train import ONE_THREAD, _launch, _overrides, _torchrun, _wait_for_step

# Long enough never to finish: the runs below end by a signal.
UNFINISHED = ("train.steps=1000", "train.checkpoint_every=1000", "train.val_every=1000")


def _dlm_train(dataset: Path, run_dir: Path, *options: str, extra=()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dlm_pretrain.launch.cli",
        "train",
        "default",
        *options,
        *_overrides(dataset, run_dir, *extra),
    ]


def _saved_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step"))


def _saved_layout(run_dir: Path) -> dict:
    tag = (run_dir / "checkpoints" / "latest").read_text()
    return json.loads((run_dir / "checkpoints" / tag / "dlm_meta.json").read_text())["layout"]


def _processes_of(run_dir: Path) -> list[psutil.Process]:
    """Every process whose command line names the run directory (dlm, the deepspeed
    runner and launcher, the workers and their data loader workers)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if any(str(run_dir) in arg for arg in proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def _no_process_left(run_dir: Path) -> None:
    """Waits up to 10 s for the run's processes to end; kills what is left (these tests
    started it) and fails naming it."""
    _, alive = psutil.wait_procs(_processes_of(run_dir), timeout=10)
    for proc in alive:
        proc.kill()
    assert not alive, f"left running: pids {[proc.pid for proc in alive]}"


def _wait_for_runner(proc: subprocess.Popen, run_dir: Path, timeout_s: float = 60) -> None:
    """Until dlm has started the deepspeed runner (so its signal handlers are in place)."""
    deadline = time.time() + timeout_s
    while not [p for p in _processes_of(run_dir) if p.pid != proc.pid]:
        assert time.time() < deadline and proc.poll() is None, "dlm started no launcher"
        time.sleep(0.05)


def _wait_for_text(log: Path, text: str, proc: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while text not in log.read_text():
        assert time.time() < deadline and proc.poll() is None, f"{log} never says {text!r}"
        time.sleep(0.05)


@pytest.mark.slow  # whole runs
def test_sigusr1_to_dlm_train_saves_on_every_rank_exits_0_and_resumes(dataset, tmp_path):
    """Regression: SIGUSR1 (SLURM's preemption warning) to `dlm train --nproc 2` killed dlm
    (exit 138) and left the deepspeed runner, its launcher and both workers running."""
    run_dir = tmp_path / "preempted"
    proc = _launch(_dlm_train(dataset, run_dir, "--nproc", "2", extra=UNFINISHED), run_dir)
    try:
        _wait_for_step(run_dir, 3, proc)
        os.killpg(proc.pid, signal.SIGUSR1)  # dlm's process group, as SLURM or a shell sends
        assert proc.wait(timeout=120) == 0
    finally:
        _no_process_left(run_dir)
    saved = _saved_step(run_dir)
    assert 3 <= saved < 1000
    assert _saved_layout(run_dir)["data"] == 2
    resumed = _launch(
        _torchrun(dataset, run_dir, 2, *UNFINISHED, f"train.steps={saved + 1}"), run_dir
    )
    try:
        assert resumed.wait(timeout=300) == 0
    finally:
        _no_process_left(run_dir)
    assert f"resumed from step {saved}" in (tmp_path / "preempted.log").read_text()
    assert _saved_step(run_dir) == saved + 1


@pytest.mark.slow  # whole runs
def test_sigterm_before_the_workers_can_take_it_is_kept_for_them(dataset, tmp_path):
    """SIGTERM while the workers are still starting (SIGUSR1 would kill a worker that has
    not installed its handler): dlm keeps the request and forwards it once they can take it;
    they save after their first step and everything exits 0."""
    run_dir = tmp_path / "early"
    proc = _launch(_dlm_train(dataset, run_dir, "--nproc", "2", extra=UNFINISHED), run_dir)
    try:
        _wait_for_runner(proc, run_dir)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=300) == 0  # the workers start, take one step and save
    finally:
        _no_process_left(run_dir)
    assert 1 <= _saved_step(run_dir) < 1000


@pytest.mark.slow  # whole runs
def test_a_second_sigint_kills_every_process_of_the_run(dataset, tmp_path):
    """Ctrl-C no longer reaches the launcher's session: a second one is how a user stops a
    run at once. Nothing is left running."""
    run_dir = tmp_path / "interrupted"
    proc = _launch(_dlm_train(dataset, run_dir, "--nproc", "2", extra=UNFINISHED), run_dir)
    try:
        _wait_for_runner(proc, run_dir)
        os.killpg(proc.pid, signal.SIGINT)
        _wait_for_text(tmp_path / "interrupted.log", "SIGINT: the workers save", proc)
        os.killpg(proc.pid, signal.SIGINT)  # after the first is handled: never merged with it
        assert proc.wait(timeout=30) == 128 + signal.SIGINT
    finally:
        _no_process_left(run_dir)


@pytest.mark.slow  # whole runs
def test_hostfile_without_nproc_uses_every_slot(dataset, tmp_path):
    (tmp_path / "hostfile").write_text("# one node\nlocalhost slots=2\n")
    run_dir = tmp_path / "hostfile-run"
    command = _dlm_train(
        dataset,
        run_dir,
        "--hostfile",
        str(tmp_path / "hostfile"),
        extra=("train.steps=2", "train.val_every=1000"),
    )
    try:
        assert _launch(command, run_dir).wait(timeout=300) == 0
    finally:
        _no_process_left(run_dir)
    assert _saved_layout(run_dir) == {"tensor": 1, "pipeline": 1, "data": 2}


@pytest.mark.parametrize(
    "hostfile, options, message",
    [
        ("localhost slots=3\n", [], "data-parallel size 3"),
        ("localhost slots=4\n", ["--nproc", "3"], "data-parallel size 3"),
        ("localhost slots=2\n", ["--nproc", "4"], "--nproc 4 exceeds the hostfile's slots"),
        ("localhost\n", [], "is not `HOST slots=N`"),
        ("# nothing\n", [], "lists no host"),
        ("localhost slots=2\n", ["--nproc", "0"], "--nproc 0 must be at least 1"),
    ],
    ids=["slots", "nproc-caps-slots", "nproc-over-slots", "no-slots", "empty", "nproc-0"],
)
def test_a_hostfile_that_does_not_fit_is_refused_before_launching(
    dataset, tmp_path, capsys, hostfile, options, message
):
    """Exit 2 before anything starts. The global batch of 16 in micro-batches of 8 splits
    over 1 or 2 data ranks, not 3."""
    (tmp_path / "hostfile").write_text(hostfile)
    args = ["train", "default", f"data.path={dataset}", f"train.run_dir={tmp_path / 'r'}"]
    assert main([*args, "--hostfile", str(tmp_path / "hostfile"), *options]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was launched


@pytest.mark.slow  # whole runs
def test_srun_without_a_launcher_trains_data_parallel(dataset, tmp_path):
    """Two tasks as srun starts them: SLURM's variables only, no RANK, WORLD_SIZE,
    LOCAL_RANK or MASTER_ADDR."""
    run_dir = tmp_path / "srun"
    torch_variables = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
    env = {
        k: v
        for k, v in ONE_THREAD.items()
        if k not in torch_variables and not k.startswith("SLURM_")
    }
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "MASTER_PORT": str(_free_port()),
    }
    command = [
        sys.executable,
        "-m",
        "dlm_pretrain.launch.train",
        "default",
        *_overrides(dataset, run_dir, "train.steps=3", "train.val_every=1000"),
    ]
    tasks = []
    with open(tmp_path / "srun.log", "w") as log:
        for rank in (0, 1):
            task_env = {**env, **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
            tasks.append(subprocess.Popen(command, env=task_env, stdout=log, stderr=log))
        try:
            assert [task.wait(timeout=300) for task in tasks] == [0, 0]
        finally:
            for task in tasks:
                task.kill()
    assert _saved_step(run_dir) == 3
    assert _saved_layout(run_dir) == {"tensor": 1, "pipeline": 1, "data": 2}


def test_expand_nodelist():
    assert expand_nodelist("gpu[03-05,9],login1") == ["gpu03", "gpu04", "gpu05", "gpu9", "login1"]
    assert expand_nodelist("n[8-11]") == ["n8", "n9", "n10", "n11"]
    assert expand_nodelist("n[098-101]") == ["n098", "n099", "n100", "n101"]
    assert expand_nodelist("rack[1-2]-gpu[1,3]") == [
        "rack1-gpu1",
        "rack1-gpu3",
        "rack2-gpu1",
        "rack2-gpu3",
    ]
    assert expand_nodelist("a,b[2],10.0.0.1") == ["a", "b2", "10.0.0.1"]


# Task 5 of 8, the second on its node, as srun starts it.
SRUN_TASK = {
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_JOB_ID": "123456",
}


def _unset_launcher_variables(monkeypatch) -> None:
    """Remove what environment_from_slurm writes, so that monkeypatch restores it afterwards
    (a bare delenv of an absent key records nothing, and the RANK=5 written here would leak
    into every later test of the session)."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def test_environment_from_slurm(monkeypatch):
    _unset_launcher_variables(monkeypatch)
    for key, value in SRUN_TASK.items():
        monkeypatch.setenv(key, value)
    environment_from_slurm()
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
    }
    assert 1024 <= int(os.environ["MASTER_PORT"]) < 32768  # unprivileged, not ephemeral
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.delenv("WORLD_SIZE")
    environment_from_slurm()
    assert os.environ["MASTER_PORT"] == "29999"  # one set by the user is kept


@pytest.mark.parametrize("case", ["launcher", "batch script"])
def test_environment_from_slurm_leaves_launched_and_batch_processes_alone(monkeypatch, case):
    """A launcher's WORLD_SIZE wins; a batch script's own process (no SLURM_STEP_ID, while
    SLURM_NTASKS counts the tasks it may start) stays one process instead of waiting for
    peers that never come."""
    _unset_launcher_variables(monkeypatch)
    for key, value in SRUN_TASK.items():
        monkeypatch.setenv(key, value)
    if case == "launcher":
        monkeypatch.setenv("WORLD_SIZE", "2")
    else:
        monkeypatch.delenv("SLURM_STEP_ID")
    environment_from_slurm()
    assert os.environ.get("WORLD_SIZE") == ("2" if case == "launcher" else None)
    assert "RANK" not in os.environ
