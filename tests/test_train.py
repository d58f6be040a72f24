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
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from distributed import _free_port, run_distributed, torchrun_command
from dlm_pretrain.pretrain.config import SamplingConfig, load_config
from dlm_pretrain.pretrain.trainer import run
from kill_at import SAVE_POINTS
from test_objectives import logits_head

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


def test_two_steps_train_validate_sample_and_save(dataset, tmp_path):
    """The whole loop in one process, small enough for the quick subset: two steps, a
    validation and a sample at each end, and the final checkpoint."""
    run_dir = _train(dataset, tmp_path / "quick", "train.steps=2", "train.val_every=2")
    assert _losses(run_dir).keys() == {1, 2}
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000002"
    assert (run_dir / "samples" / "step00000002.txt").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ar", "mdlm", "duo", "gidd", "esolm"])
def test_loss_falls_for_each_objective(dataset, tmp_path, objective):
    extra = ("train.steps=40", "train.val_every=40", "train.checkpoint_every=40")
    run_dir = _train(dataset, tmp_path / objective, f"objective.name={objective}", *extra)
    losses = list(_losses(run_dir).values())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000040"
    assert (run_dir / "samples" / "step00000040.txt").stat().st_size > 0


@pytest.mark.slow
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
    assert {"config.yaml", "loss_curve.png", "samples"} <= artifacts
    samples = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "samples")}
    assert samples == {f"samples/step{s:08d}.txt" for s in (0, 5, 10)}
    # beside the store, not in whatever directory the run started from
    assert mlflow_run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert not (Path.cwd() / "mlruns").exists()


# Bitwise equality needs the same float32 kernels: torchrun sets one OpenMP thread per
# process, the deepspeed launcher does not, and the matmul blocking follows the thread count.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


# Execs its arguments with SIGINT and SIGHUP at their defaults, as a terminal starts a command,
# whatever the test runner inherited: a background job ignores SIGINT, nohup SIGHUP, and an
# ignored signal stays ignored through exec (dlm leaves it so, by design).
_DEFAULT_SIGNALS = (
    "import os, signal, sys\n"
    "for s in (signal.SIGINT, signal.SIGHUP): signal.signal(s, signal.SIG_DFL)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def _launch(args: list[str], run_dir: Path) -> subprocess.Popen:
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [sys.executable, "-c", _DEFAULT_SIGNALS, *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=ONE_THREAD,
    )


def _torchrun(dataset: Path, run_dir: Path, nproc: int, *extra: str) -> list[str]:
    return torchrun_command(nproc, "default", *_overrides(dataset, run_dir, *extra))


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        log = run_dir / "train_log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}")


def _straight(dataset: Path, run_dir: Path, nproc: int, *settings: str) -> None:
    """An uninterrupted run through `dlm train --nproc` (the deepspeed launcher)."""
    command = [sys.executable, "-m", "dlm_pretrain.launch.cli", "train", "default"]
    command += ["--nproc", str(nproc), *_overrides(dataset, run_dir, *settings)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    assert subprocess.call(command, env=ONE_THREAD, **quiet) == 0


KILLABLE = ("train.steps=12", "train.checkpoint_every=4", "train.val_every=100")


@pytest.mark.slow
def test_data_parallel_equals_one_process_and_sigkill_resumes_every_loss(dataset, tmp_path):
    """Two data ranks through the deepspeed launcher, uninterrupted: the losses of one
    process (within 1e-5), which reads the same two streams with two loader workers into the
    same rows of each global batch of 16 (2 ranks x 8). The same run through torchrun
    killed with SIGKILL at step 5 and started again: bitwise equal losses. GIDD: its noise
    draws both the mask and uniform ids (the other tests resume MDLM)."""
    gidd = "objective.name=gidd"
    steps = [*KILLABLE, gidd, "data.num_workers=1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _straight(dataset, straight, 2, *steps)
    one = _losses(_train(dataset, tmp_path / "one", *KILLABLE, gidd, "data.num_workers=2"))
    assert one.keys() == _losses(straight).keys() == set(range(1, 13))
    assert all(abs(one[s] - x) <= 1e-5 * abs(one[s]) for s, x in _losses(straight).items())
    proc = _launch(_torchrun(dataset, killed, 2, *steps), killed)
    _wait_for_step(killed, 5, proc)  # three steps before the next checkpoint: room for a slow kill
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "latest").read_text() == "step00000004"
    assert _launch(_torchrun(dataset, killed, 2, *steps), killed).wait() == 0
    assert _losses(killed) == _losses(straight)


# One process stopped (a signal) or killed (inside a save) and started again, against the
# same run never interrupted: every loss equal means the data position resumed exactly. It
# trains Eso-LM with both branches, whose sort order and row split must resume as exactly
# as the noise (the other resume tests train MDLM and GIDD).
RESUMABLE = (
    "train.steps=16",
    "train.checkpoint_every=4",
    "train.val_every=100",
    "objective.name=esolm",
    "objective.alpha_0=0.5",
    "objective.batch_split=0.5",
)
KILL_AT = str(Path(__file__).with_name("kill_at.py"))


def _one_process(dataset: Path, run_dir: Path, *entry: str) -> list[str]:
    entry = entry or ("-m", "dlm_pretrain.launch.train")
    return [sys.executable, *entry, "default", *_overrides(dataset, run_dir, *RESUMABLE)]


def _saved_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step"))


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory) -> dict[int, float]:
    """The losses of the RESUMABLE run in one process, never stopped."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert _launch(_one_process(dataset, run_dir), run_dir).wait(timeout=300) == 0
    losses = _losses(run_dir)
    assert losses.keys() == set(range(1, 17))
    return losses


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_exits_0_and_resumes_exactly(
    dataset, tmp_path, uninterrupted
):
    """SIGTERM to a training process (a preemption; SLURM's SIGUSR1 warning takes the same
    handler, tested through the launcher in tests/test_launchers.py): it saves at the next
    step boundary and exits 0; started again, it resumes from that checkpoint with the exact
    data position. A process that ignored the signal would train on to step 16; one that
    took the default action would die with -SIGTERM."""
    run_dir = tmp_path / "preempted"
    proc = _launch(_one_process(dataset, run_dir), run_dir)
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    saved = _saved_step(run_dir)
    assert 3 <= saved < 16, f"the run went on to step {saved}"
    assert max(_losses(run_dir)) == saved, "the run did not stop at the step it saved"
    assert _launch(_one_process(dataset, run_dir), run_dir).wait(timeout=300) == 0
    assert f"resumed from step {saved}" in (tmp_path / "preempted.log").read_text()
    assert _losses(run_dir) == uninterrupted


@pytest.mark.slow
def test_a_kill_inside_a_save_leaves_the_previous_checkpoint(dataset, tmp_path, uninterrupted):
    """SIGKILL inside step 8's save (tests/kill_at.py kills the process there every
    time), at each point in turn: while the engine writes its shards, before the staged
    directory is renamed, after the rename but before `latest` names it. `latest` still names
    step 4's complete checkpoint each time, every start removes the partial save it finds
    and loads step 4, and the last one reproduces every loss of the uninterrupted run."""
    run_dir = tmp_path / "killed"
    root, staged = run_dir / "checkpoints", run_dir / "checkpoints" / ".incomplete-step00000008"
    for point in SAVE_POINTS:
        proc = _launch(_one_process(dataset, run_dir, KILL_AT, f"save:8:{point}"), run_dir)
        assert proc.wait(timeout=300) == -signal.SIGKILL, point
        assert (root / "latest").read_text() == "step00000004", point
        if point == "latest":
            assert (root / "step00000008").is_dir() and not staged.exists()
        else:
            assert staged.is_dir() and not (root / "step00000008").exists(), point
    assert _launch(_one_process(dataset, run_dir), run_dir).wait(timeout=300) == 0
    log = (tmp_path / "killed.log").read_text()
    assert log.count("resumed from step 4") == len(SAVE_POINTS)  # every start after the first
    assert not list(root.glob(".incomplete-*"))
    assert _losses(run_dir) == uninterrupted


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_flops_budget_sets_the_number_of_steps(dataset, tmp_path):
    """The budget is counted on the tokenizer's vocabulary, not the padded model's."""
    from dlm_pretrain.data_pipeline import open_dataset
    from dlm_pretrain.parallel.config import ModelConfig
    from dlm_pretrain.pretrain.flops import training_flops_per_sequence

    manifest = open_dataset(dataset)
    cfg = load_config("default", _overrides(dataset, tmp_path / "budget"))
    model_cfg = ModelConfig.preset(
        cfg.model.size, vocab_size=manifest.tokenizer["vocab_size"], seq_len=manifest.seq_len
    )
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


class _FavoursTheIdsThatAreNotReal:
    """A model as a sampler sees it (objectives.objective.Denoiser) whose logits put almost
    all the mass on the ids that are not real: a sampler that let them through draws them."""

    device = torch.device("cpu")

    def __init__(self, vocab) -> None:
        g = torch.Generator().manual_seed(0)
        self.row = torch.randn(vocab.size, generator=g).masked_fill(~vocab.real, 30.0)

    def logits(self, tokens: torch.Tensor, s: torch.Tensor, positions=None) -> torch.Tensor:
        return self.row.expand(*tokens.shape, -1)

    def decoder(self):
        return lambda tokens, s, positions=None, keep=None: self.logits(tokens, s, positions)


def test_vocabulary_is_padded_per_tensor_size_and_padding_is_never_real(dataset):
    """V is the tokenizer's size rounded up to a multiple of 128 x tensor size: for 300 pieces
    384, 512 and 1024 at tensor sizes 1, 2 and 8 (padding that ignored the tensor size, or
    multiplied it in after rounding, gives another V). The padding ids, the tokenizer's pad
    and the mask are never noised to, take no probability in any loss, and are never sampled,
    even from logits that favour them."""
    from dlm_pretrain.data_pipeline import open_dataset
    from dlm_pretrain.pretrain.model_spec import model_spec
    from dlm_pretrain.pretrain.objectives import OBJECTIVES

    manifest = open_dataset(dataset)
    manifest = replace(manifest, tokenizer={**manifest.tokenizer, "vocab_size": 300})
    special = manifest.tokenizer["special_ids"]
    pad, mask = special["pad"], special["mask"]
    for tensor, padded in [(1, 384), (2, 512), (8, 1024)]:
        overrides = _overrides(
            dataset, Path("unused"), "model.size=34M", f"parallel.tensor={tensor}"
        )
        model_cfg, vocab = model_spec(load_config("default", overrides), manifest)  # 8 heads
        assert model_cfg.vocab_size == vocab.size == padded
        assert vocab.excluded == {pad, mask, *range(300, padded)}
        assert vocab.real.sum() == vocab.num_real == 300 - 2
    g = torch.Generator().manual_seed(1)
    x0 = vocab.real_ids[torch.randint(vocab.num_real, (32, 64), generator=g)]
    t = torch.full((32,), 0.999)  # nearly every token corrupted
    logits = torch.randn(32, 64, vocab.size, generator=g)
    favoured, suppressed = (
        logits.masked_fill(~vocab.real, 30.0),
        logits.masked_fill(~vocab.real, -30.0),
    )
    sampling = SamplingConfig(steps=4, num_samples=2)
    for name, objective_type in OBJECTIVES.items():
        objective = objective_type()
        xt = objective.noise(x0, t, torch.arange(32), vocab)
        noised_to = xt[xt != x0]
        assert name == "ar" or noised_to.numel() > 0.9 * xt.numel()
        assert torch.all(vocab.real[noised_to] | (noised_to == mask)), name
        loss = objective.per_token_loss(logits_head(favoured), x0, xt, t, vocab)
        unmoved = objective.per_token_loss(logits_head(suppressed), x0, xt, t, vocab)
        assert torch.equal(loss, unmoved), name
        samples = objective.sample(
            _FavoursTheIdsThatAreNotReal(vocab), vocab, sampling, 16, special["eos"]
        )
        assert vocab.real[samples.tokens].all(), name


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


@pytest.mark.slow
def test_unreachable_tracking_server_does_not_stop_the_run(dataset, tmp_path, caplog):
    port = _free_port()  # nothing listens there
    run_dir = _train(
        dataset, tmp_path / "offline", "train.steps=2", f"tracking.uri=http://127.0.0.1:{port}"
    )
    assert _losses(run_dir).keys() == {1, 2}
    warnings = [r for r in caplog.records if "continuing without tracking" in r.getMessage()]
    assert len(warnings) == 1
