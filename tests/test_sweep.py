"""`dlm sweep`: the sweep file, the plan (steps, tokens, epochs, refusals) and the local
backend launching, stopping and resuming real runs through the deepspeed launcher."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.data_pipeline import open_dataset
from dlm_pretrain.launch.sweep.config import load_sweep
from dlm_pretrain.launch.sweep.plan import PLAN_CSV, plan_sweep, refusals, write_plan
from dlm_pretrain.launch.sweep.results import fit_and_report
from dlm_pretrain.launch.sweep.runner import launch_local
from dlm_pretrain.launch.sweep.status import status_table, sweep_status
from dlm_pretrain.parallel.config import ModelConfig, parameter_count
from dlm_pretrain.pretrain.flops import training_flops_per_sequence

ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _sweep_file(tmp_path: Path, dataset: Path, **changes) -> Path:
    tree = {
        "name": "t",
        "runs_dir": str(tmp_path / "runs"),
        "objectives": ["ar", "mdlm"],
        "sizes": ["micro", "tiny"],
        "budgets": [4e9, 1.2e10],
        "settings": {"data.path": str(dataset), "train.global_batch": 8, "train.micro_batch": 4},
        "checks": {"min_steps": 2},
        # its own store: MLflow exports MLFLOW_TRACKING_URI once a test in this process has
        # set a tracking URI, and the sweep would follow it
        "tracking": {"uri": f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"},
    }
    tree.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_the_plan_counts_steps_tokens_and_epochs_from_the_flops_formula(dataset, tmp_path):
    """Each run's steps, tokens, parameters and epochs, against the FLOPs module directly with
    the tokenizer's vocabulary; the CSV holds the same numbers."""
    sweep = load_sweep(_sweep_file(tmp_path, dataset, lr={"value": 1e-3, "exponent": 0.5}))
    runs = plan_sweep(sweep)
    manifest = open_dataset(dataset)
    vocab, length = manifest.tokenizer["vocab_size"], manifest.seq_len
    train_tokens = manifest.splits["train"].sequences * length
    assert [r.name for r in runs][:2] == ["ar-micro-4e9", "ar-tiny-4e9"]
    assert len(runs) == 8 and not refusals(runs)
    for run in runs:
        model = ModelConfig.preset(run.size, vocab_size=vocab, seq_len=length)
        name = "ar" if run.objective == "ar" else "mdlm"
        per_step = training_flops_per_sequence(model, name, length) * 8
        assert run.steps == int(run.budget / per_step) > 0
        assert run.flops == run.steps * per_step <= run.budget
        assert run.tokens == run.steps * 8 * length
        assert run.epochs == pytest.approx(run.tokens / train_tokens)
        assert run.parameters == parameter_count(model)
        assert run.non_embedding == run.parameters - vocab * model.hidden_size
        lr = 1e-3 * (run.non_embedding / 1e6) ** -0.5
        assert f"optim.lr={lr:.6g}" in run.settings
    csv_path, _ = write_plan(runs, tmp_path / "runs")
    rows = list(csv.DictReader(csv_path.open()))
    assert csv_path.name == PLAN_CSV
    assert [int(r["steps"]) for r in rows] == [r.steps for r in runs]
    assert [float(r["epochs"]) for r in rows] == pytest.approx([r.epochs for r in runs])


def test_the_plan_refuses_short_runs_repeated_data_and_a_batch_the_layout_cannot_split(
    dataset, tmp_path
):
    sweep = load_sweep(
        _sweep_file(
            tmp_path,
            dataset,
            budgets=[4e9, 1e14],
            checks={"min_steps": 10, "max_epochs": 1.0},
            backend={"nproc": 3},
        )
    )
    problems = "\n".join(refusals(plan_sweep(sweep)))
    assert "9 steps, fewer than checks.min_steps=10" in problems  # tiny at 4e9
    assert "epochs of the data, more than checks.max_epochs=1" in problems
    assert "data-parallel size 3" in problems  # 8 sequences over 3 ranks


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sizes": ["tiny", "huge"]}, r"sizes: unknown \['huge'\]"),
        ({"budgets": [1e12, -1.0]}, "must all be positive"),
        ({"backend": {"kind": "kubernetes"}}, "backend.kind='kubernetes' is not one of"),
        ({"lr": {"valeu": 1e-3}}, "did you mean lr.value"),
    ],
)
def test_a_bad_sweep_file_is_refused_naming_the_key(dataset, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(_sweep_file(tmp_path, dataset, **change))


def test_a_run_setting_that_does_not_exist_is_refused_before_anything_runs(dataset, tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, dataset, objectives={"mdlm": {"objective.nam": 1}}))
    with pytest.raises(ConfigError, match=r"did you mean objective\.name"):
        plan_sweep(sweep)


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    """A failed test kills what its `dlm sweep` left running (runs live in their own sessions)."""
    yield
    for proc in _STARTED:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
        proc.kill()
    _STARTED.clear()


def _dlm(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "dlm_pretrain.launch.cli", *args]
    _STARTED.append(subprocess.Popen(command, cwd=cwd, env=ONE_THREAD_ENV, text=True, **kwargs))
    return _STARTED[-1]


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines)}


def _log_tails(runs) -> str:
    """The end of each run's launch.log: why a run failed, in the assertion's message."""
    logs = (run.run_dir / "launch.log" for run in runs)
    return "\n".join(f"== {p}\n" + "\n".join(p.read_text().splitlines()[-30:]) for p in logs)


@pytest.mark.slow
def test_a_local_sweep_stops_on_sigterm_resumes_and_skips_what_is_done(dataset, tmp_path, capsys):
    """Two runs side by side through the deepspeed launcher; SIGTERM to `dlm sweep launch`
    reaches both, which save and stop; launching again finishes them from their checkpoints
    and a third launch has nothing to do. Every run is an MLflow child of the sweep's parent,
    tagged with its objective, size, parameters and budget."""
    settings = {
        "data.path": str(dataset),
        "train.global_batch": 8,
        "train.micro_batch": 4,
        "train.checkpoint_every": 25,
        "train.val_every": 1000,
        "train.val_sequences": 8,
        "data.num_workers": 0,
    }
    path = _sweep_file(
        tmp_path,
        dataset,
        sizes=["micro"],
        budgets=[4.5e10],
        settings=settings,
        backend={"concurrent": 2},
        checks={"min_steps": 2, "max_epochs": 5},
    )  # fmt: skip  (~300 steps at ~20 a second: long enough for the stop to land mid-run)
    sweep = load_sweep(path)
    runs = plan_sweep(sweep)
    launch = _dlm("sweep", "launch", str(path), cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not all((r.run_dir / "checkpoints" / "latest").is_file() for r in runs):
        assert launch.poll() is None and time.monotonic() < deadline, "no checkpoints"
        time.sleep(0.5)
    launch.send_signal(signal.SIGTERM)
    assert launch.wait(timeout=120) == 128 + signal.SIGTERM
    stopped = {r.name: max(_losses(r.run_dir)) for r in runs}
    assert all(step < r.steps for step, r in zip(stopped.values(), runs, strict=True)), stopped

    # the rest in this process: the commands' own functions, without their start-up
    assert launch_local(path, sweep, runs) == 0, _log_tails(runs)
    for run in runs:
        assert sorted(_losses(run.run_dir)) == list(range(1, run.steps + 1))
    capsys.readouterr()
    assert launch_local(path, sweep, runs) == 0  # nothing left to do
    out = capsys.readouterr().out
    assert out.count("done (") == 2 and "started" not in out
    assert "2 runs: 2 done" in status_table(sweep_status(sweep, runs))
    children = _children(sweep)
    assert sorted(children) == sorted(r.name for r in runs)
    for run in runs:
        tags = children[run.name]["tags"]
        assert tags["sweep"] == "t" and tags["objective"] == run.objective
        assert (tags["size"], float(tags["budget"])) == ("micro", run.budget)
        assert int(tags["parameters"]) == run.non_embedding
        assert (tags["convention"], int(tags["steps"])) == ("exact", run.steps)
        assert children[run.name]["metrics"]["val/loss"] > 0

    # the fit reads the final losses back from MLflow; one size per objective is no profile
    report = fit_and_report(sweep, runs, Path(sweep.runs_dir) / "fit")
    rows = list(csv.DictReader((Path(sweep.runs_dir) / "fit" / "scaling_fit.csv").open()))
    assert sorted(r["objective"] for r in rows) == ["ar", "mdlm"]
    assert "a parabola needs >= 3" in report, report


def _children(sweep) -> dict[str, dict]:
    from dlm_pretrain.launch.sweep.config import tracking_target
    from dlm_pretrain.launch.sweep.runner import PARENT_ID_FILE
    from dlm_pretrain.pretrain.tracking import sweep_children

    parent = (Path(sweep.runs_dir) / PARENT_ID_FILE).read_text().strip()
    return {c["name"]: c for c in sweep_children(tracking_target(sweep)[0], parent)}


def test_the_cli_lists_the_sweep_actions():
    out = subprocess.run(
        [sys.executable, "-m", "dlm_pretrain.launch.cli", "sweep", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    ).stdout
    assert all(action in out for action in ("plan", "launch", "status", "fit"))
    assert "SUPPRESS" not in out and "    run " not in out
