"""The training loop on the test dataset: losses fall, data parallel equals one process,
checkpoints resume exactly (also after SIGKILL, through real launchers), saves are atomic,
MLflow holds the run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import _free_port, run_distributed
from dlm_pretrain.pretrain.config import SamplingConfig, load_config
from dlm_pretrain.pretrain.run_sampling import sample_run
from dlm_pretrain.pretrain.trainer import run

pytestmark = pytest.mark.slow  # several processes or whole runs: not in the quick subset

BASE = [
    "model.size=tiny",
    "train.log_every=5",
    "train.val_sequences=32",
    "train.num_samples=1",
    "train.sample_steps=8",
    "optim.min_warmup_steps=5",
    "optim.lr=3e-3",
]


def _overrides(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.path={dataset}", f"train.run_dir={run_dir}", *BASE, *extra]


def _train(dataset, run_dir, *extra):
    cfg = load_config("default", _overrides(dataset, run_dir, *extra))
    return run(cfg)


def _losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a step re-run after a resume keeps its last record."""
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.parametrize("objective", ["ar", "mdlm", "duo"])
def test_loss_falls_for_each_objective(dataset, tmp_path, objective):
    extra = ("train.steps=40", "train.val_every=40", "train.checkpoint_every=40")
    run_dir = _train(dataset, tmp_path / objective, f"objective.name={objective}", *extra)
    losses = list(_losses(run_dir).values())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000040"
    assert (run_dir / "samples" / "step00000040.txt").stat().st_size > 0


@pytest.mark.parametrize("objective", ["mdlm", "duo"])
def test_fused_and_plain_losses_train_alike(dataset, tmp_path, objective):
    """The memory-lean loss kernels (the default) and the plain PyTorch path: same losses."""
    extra = (f"objective.name={objective}", "train.steps=8", "train.val_every=100")
    fused = _losses(_train(dataset, tmp_path / "fused", *extra))
    plain = _losses(_train(dataset, tmp_path / "plain", *extra, "objective.fused=false"))
    assert fused.keys() == plain.keys() == set(range(1, 9))
    assert all(abs(fused[s] - plain[s]) <= 1e-5 * abs(plain[s]) for s in plain)


def test_mlflow_holds_params_metrics_and_artifacts(dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = _train(dataset, tmp_path / "tracked", "train.steps=10", "train.val_every=5")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow_run = client.get_run((run_dir / "mlflow_run_id").read_text())
    assert mlflow_run.data.params["objective.name"] == "mdlm"
    assert mlflow_run.data.params["train.steps"] == "10"
    history = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    assert [m.step for m in history] == [5, 10]
    perplexity = client.get_metric_history(mlflow_run.info.run_id, "val/perplexity")
    assert [m.step for m in perplexity] == [0, 5, 10]
    assert perplexity[-1].value < perplexity[0].value
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"config.yaml", "loss_curve.png", "step00000000.txt", "step00000010.txt"} <= artifacts
    # beside the store, not in whatever directory the run started from
    assert mlflow_run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert not (Path.cwd() / "mlruns").exists()


def _dp2(rank: int, world_size: int, dataset: Path, run_dir: Path) -> None:
    _train(dataset, run_dir, "train.steps=10", "data.num_workers=1", "train.micro_batch=8")


def test_data_parallel_2_equals_one_process(dataset, tmp_path):
    """The same global batches: one process with two loader workers reads the same two
    streams as two ranks with one worker each (16 = 2 x 8 sequences per step)."""
    one = _train(
        dataset, tmp_path / "dp1", "train.steps=10", "data.num_workers=2", "train.micro_batch=8"
    )
    run_distributed(_dp2, 2, dataset, tmp_path / "dp2")
    a, b = _losses(one), _losses(tmp_path / "dp2")
    assert a.keys() == b.keys() == set(range(1, 11))
    assert all(abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) for s in a)


# Bitwise equality needs the same float32 kernels: torchrun sets one OpenMP thread per
# process, the deepspeed launcher does not, and the matmul blocking follows the thread count.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def _launch(args: list[str], run_dir: Path) -> subprocess.Popen:
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ONE_THREAD
    )


def _torchrun(dataset: Path, run_dir: Path, nproc: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(_free_port()),
        "-m",
        "dlm_pretrain.launch.train",
        "default",
        *_overrides(dataset, run_dir, *extra),
    ]


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        log = run_dir / "train_log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}")


@pytest.mark.parametrize(
    "nproc, layout",
    [(2, []), (4, ["parallel.tensor=2", "parallel.pipeline=2"])],
    ids=["dp2", "tp2xpp2"],
)
def test_sigkill_and_resume_reproduce_every_loss(dataset, tmp_path, nproc, layout):
    """A run through the deepspeed launcher uninterrupted, against the same run through
    torchrun killed with SIGKILL at step 5 and started again: bitwise equal losses. The
    tensor 2 x pipeline 2 run also equals one process (within 1e-5)."""
    steps = [
        "train.steps=12",
        "train.checkpoint_every=4",
        "train.val_every=100",
        "data.num_workers=1",
        *layout,
    ]
    straight = tmp_path / "straight"
    code = subprocess.call(
        [
            sys.executable,
            "-m",
            "dlm_pretrain.launch.cli",
            "train",
            "default",
            "--nproc",
            str(nproc),
            *_overrides(dataset, straight, *steps),
        ],
        env=ONE_THREAD,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert code == 0
    killed = tmp_path / "killed"
    proc = _launch(_torchrun(dataset, killed, nproc, *steps), killed)
    _wait_for_step(killed, 5, proc)  # three steps before the next checkpoint: room for a slow kill
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "latest").read_text() == "step00000004"
    assert _launch(_torchrun(dataset, killed, nproc, *steps), killed).wait() == 0
    assert _losses(killed) == _losses(straight)
    if layout:
        one = _train(dataset, tmp_path / "one", *steps[: -len(layout)])
        reference = _losses(one)
        assert all(
            abs(reference[s] - x) <= 1e-5 * abs(reference[s]) for s, x in _losses(straight).items()
        )
        # one process samples from the merged shards what it samples from its own run
        sampling = SamplingConfig(steps=4, num_samples=2)
        assert sample_run(straight, sampling).texts == sample_run(one, sampling).texts


def test_sigterm_saves_and_exits_cleanly(dataset, tmp_path):
    run_dir = tmp_path / "preempted"
    extra = ("train.steps=1000", "train.checkpoint_every=1000")
    command = [
        sys.executable,
        "-m",
        "dlm_pretrain.launch.train",
        "default",
        *_overrides(dataset, run_dir, *extra),
    ]
    proc = _launch(command, run_dir)
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    tag = (run_dir / "checkpoints" / "latest").read_text()
    assert 3 <= int(tag.removeprefix("step")) < 1000


def test_kill_during_a_save_leaves_the_previous_checkpoint(dataset, tmp_path):
    """SIGKILL while a checkpoint is being written: `latest` still names a complete one,
    and the next start resumes from it and removes the partial save."""
    run_dir = tmp_path / "atomic"

    def command(steps: int) -> list[str]:
        extra = (
            "model.size=19M",
            f"train.steps={steps}",
            "train.checkpoint_every=1",
            "train.val_every=1000",
        )
        return [
            sys.executable,
            "-m",
            "dlm_pretrain.launch.train",
            "default",
            *_overrides(dataset, run_dir, *extra),
        ]

    proc = _launch(command(1000), run_dir)
    deadline = time.time() + 300
    root = run_dir / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        if (root / "latest").is_file() and list(root.glob(".incomplete-*")):
            break
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(root.glob(".incomplete-*")), "the kill did not land inside a save"
    tag = (root / "latest").read_text()
    assert (root / tag).is_dir()
    resumed = _launch(command(int(tag.removeprefix("step")) + 1), run_dir)
    assert resumed.wait(timeout=300) == 0
    assert not list(root.glob(".incomplete-*"))
    assert "resumed from step" in (run_dir.parent / "atomic.log").read_text()


def test_non_finite_steps_are_skipped_then_stop_the_run(dataset, tmp_path):
    """A learning rate of 1e30 overflows the parameters after one update; the next steps
    are non-finite, skipped and counted, and the third in a row stops the run with a
    checkpoint."""
    from dlm_pretrain.pretrain.trainer import DivergenceError

    with pytest.raises(DivergenceError, match="3 non-finite steps in a row"):
        _train(
            dataset,
            tmp_path / "diverged",
            "optim.lr=1e30",
            "optim.min_lr=1e29",
            "train.steps=20",
            "train.max_bad_steps=3",
            "optim.min_warmup_steps=1",
        )
    records = [
        json.loads(x) for x in (tmp_path / "diverged/train_log.jsonl").read_text().split("\n") if x
    ]
    bad = [r for r in records if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]))]
    assert len(bad) == 3 and records[-3:] == bad
    assert (tmp_path / "diverged/checkpoints/latest").is_file()


def test_resume_in_one_process_and_on_another_data_parallel_size(dataset, tmp_path):
    """dp=1 stopped at step 4 and restarted matches an uninterrupted run exactly; the same
    checkpoint then continues on dp=2, and `dlm sample` reads the result."""
    from dlm_pretrain.launch.cli import main

    extra = ("train.checkpoint_every=4", "train.val_every=100", "data.num_workers=2")
    straight = _train(dataset, tmp_path / "straight", "train.steps=8", *extra)
    _train(dataset, tmp_path / "resumed", "train.steps=4", *extra)
    _train(dataset, tmp_path / "resumed", "train.steps=8", *extra)
    assert _losses(tmp_path / "resumed") == _losses(straight)
    run_distributed(_continue_on_dp2, 2, dataset, tmp_path / "resumed")
    assert sorted(_losses(tmp_path / "resumed")) == list(range(1, 13))
    assert main(["sample", str(tmp_path / "resumed"), "steps=4", "num_samples=1"]) == 0


def _continue_on_dp2(rank: int, world_size: int, dataset: Path, run_dir: Path) -> None:
    _train(
        dataset,
        run_dir,
        "train.steps=12",
        "train.checkpoint_every=4",
        "train.val_every=100",
        "data.num_workers=1",
    )


def test_flops_budget_sets_the_number_of_steps(dataset, tmp_path):
    from dlm_pretrain.data_pipeline import open_dataset
    from dlm_pretrain.pretrain.flops import training_flops_per_sequence
    from dlm_pretrain.pretrain.model_spec import model_spec

    cfg = load_config("default", _overrides(dataset, tmp_path / "budget"))
    model_cfg, _ = model_spec(cfg, open_dataset(dataset))
    per_step = training_flops_per_sequence(model_cfg, "mdlm", model_cfg.seq_len) * 16
    _train(
        dataset,
        tmp_path / "budget",
        "train.steps=0",
        f"train.flops_budget={7.5 * per_step}",
        "train.val_every=100",
    )
    assert sorted(_losses(tmp_path / "budget")) == list(range(1, 8))


def test_a_dataset_that_does_not_match_the_run_is_refused(dataset, tmp_path):
    from dlm_pretrain.common.errors import DataError

    with pytest.raises(DataError, match="seq_len=128"):
        _train(dataset, tmp_path / "mismatch", "train.steps=1", "data.seq_len=128")


def test_vocabulary_is_padded_and_padding_is_never_real(dataset):
    from dlm_pretrain.data_pipeline import open_dataset
    from dlm_pretrain.pretrain.model_spec import model_spec

    manifest = open_dataset(dataset)  # 400 pieces
    for tensor, padded in [(1, 512), (2, 512)]:
        cfg = load_config(
            "default", _overrides(dataset, Path("unused"), f"parallel.tensor={tensor}")
        )
        model_cfg, vocab = model_spec(cfg, manifest)
        assert model_cfg.vocab_size == vocab.size == padded
        assert not vocab.real[400:].any() and vocab.num_real == 400 - 2  # pad and mask too


def test_config_overrides_are_strict(dataset):
    from dlm_pretrain.common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"did you mean train\.steps"):
        load_config("default", ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"train\.steps=.many. is not a valid int"):
        load_config("default", ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"not divisible by train\.micro_batch"):
        load_config("default", ["train.global_batch=12", "train.micro_batch=8"])
    with pytest.raises(ConfigError, match=r"not divisible by parallel\.tensor=3"):
        load_config("default", ["model.size=cpu-small", "parallel.tensor=3"])
    with pytest.raises(ConfigError, match=r"fewer than parallel\.pipeline=5"):
        load_config("default", ["model.size=cpu-small", "parallel.pipeline=5"])
    with pytest.raises(ConfigError, match=r"parallel\.partition='balanced' is not one of"):
        load_config("default", ["parallel.partition=balanced"])
    assert load_config("default", ["optim.lr=3e-4"]).optim.lr == 3e-4


def test_unreachable_tracking_server_does_not_stop_the_run(dataset, tmp_path, caplog):
    port = _free_port()  # nothing listens there
    run_dir = _train(
        dataset, tmp_path / "offline", "train.steps=2", f"tracking.uri=http://127.0.0.1:{port}"
    )
    assert _losses(run_dir).keys() == {1, 2}
    warnings = [r for r in caplog.records if "continuing without tracking" in r.getMessage()]
    assert len(warnings) == 1
