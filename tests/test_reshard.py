"""A training checkpoint moved to another tensor x pipeline layout continues with the losses
it would have had at the old one; bad checkpoints are refused before anything is written."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from distributed import torchrun_command
from dlm_pretrain.checkpoints_tools.reshard import reshard
from dlm_pretrain.common.errors import CheckpointError, ConfigError
from dlm_pretrain.pretrain.checkpoint_files import layer_file, read_weights
from dlm_pretrain.pretrain.config import SamplingConfig, load_config
from dlm_pretrain.pretrain.run_sampling import sample_run
from dlm_pretrain.pretrain.trainer import run
from test_train import ONE_THREAD, _losses, _train

SETTINGS = ("model.size=tiny", "train.val_every=100", "data.num_workers=1", "optim.lr=3e-3")


def _torchrun(nproc: int, *args: str) -> None:
    command = torchrun_command(nproc, *args)
    subprocess.run(command, check=True, env=ONE_THREAD, stdout=subprocess.DEVNULL)


def _segment(run_dir: Path, steps: int) -> list[str]:
    """Settings that continue a run directory to `steps` (its final checkpoint)."""
    return [f"train.run_dir={run_dir}", f"train.steps={steps}", f"train.checkpoint_every={steps}"]


def _continue(run_dir: Path, steps: int, *layout: str) -> None:
    """The run directory's own config, continued to `steps` in this process (one rank)."""
    run(load_config(str(run_dir / "config.yaml"), [*_segment(run_dir, steps), *layout]))


def _after(run_dir: Path, step: int) -> dict[int, float]:
    return {s: x for s, x in _losses(run_dir).items() if s > step}


@pytest.mark.slow
def test_reshard_t2xp2_to_t1p1_to_t2p1_continues_with_the_same_losses(dataset, tmp_path):
    """A tensor 2 x pipeline 2 run to step 4, continued by 5 steps at tensor 1 x pipeline 1
    (`dlm train` converts on its own), then by 5 at tensor 2 x pipeline 1 (`reshard --out`
    writes the run directory), against the same segments in one process all along: the
    losses of steps 1-14 agree to 1e-5 (every layout computes what one process does,
    tests/test_parallel.py), and one process samples from the T2xP2 checkpoint, its shards
    merged, what it samples from its own."""
    first = ("default", f"data.path={dataset}", *SETTINGS, "train.steps=4")
    moved, t2, one = tmp_path / "moved", tmp_path / "t2", tmp_path / "one"
    _torchrun(4, *first, f"train.run_dir={moved}", "parallel.tensor=2", "parallel.pipeline=2")
    run(load_config(first[0], [*first[1:], f"train.run_dir={one}"]))
    sampling = SamplingConfig(steps=4, num_samples=2)
    assert sample_run(moved, sampling).texts == sample_run(one, sampling).texts

    _continue(moved, 9, "parallel.tensor=1", "parallel.pipeline=1")
    reshard(moved, tensor=2, pipeline=1, out=t2)
    _torchrun(2, str(t2 / "config.yaml"), *_segment(t2, 14))
    _continue(one, 9)
    _continue(one, 14)
    reference, continued = _losses(one), _losses(moved) | _after(t2, 9)
    assert reference.keys() == continued.keys() == set(range(1, 15))
    assert all(abs(reference[s] - continued[s]) <= 1e-5 * abs(reference[s]) for s in reference)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    """One step in one process: a checkpoint to damage."""
    run_dir = tmp_path_factory.mktemp("reshard") / "run"
    _train(dataset, run_dir, "train.steps=1", "train.val_every=100")
    return run_dir


def _damaged(trained: Path, tmp_path: Path, damage) -> Path:
    run_dir = tmp_path / "damaged"
    shutil.copytree(trained, run_dir)
    damage(layer_file(run_dir / "checkpoints/step00000001", 2, 0))
    return run_dir


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_checkpoint_is_refused_and_nothing_is_written(trained, tmp_path, damage):
    def spoil(path: Path) -> None:
        if damage == "missing":
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[:100])

    run_dir = _damaged(trained, tmp_path, spoil)
    with pytest.raises(CheckpointError, match="layer_02-model_00"):
        reshard(run_dir, 2, 1, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step00000001"]


def test_a_run_without_a_checkpoint_and_a_layout_that_cannot_split_are_refused(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        reshard(tmp_path / "empty", 2, 1)
    with pytest.raises(ConfigError, match="tensor"):
        reshard(trained, 3, 1, tmp_path / "out")  # 2 heads
    assert not (tmp_path / "out").exists()


def test_layer_files_cut_for_another_tensor_size_join_back_to_the_same_model(trained, tmp_path):
    from dlm_pretrain.pretrain.checkpoint import write_universal

    source = trained / "checkpoints/step00000001"
    write_universal(source, tmp_path / "t2", tensor=2)
    before, after = read_weights(source), read_weights(tmp_path / "t2")
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] is None or torch.equal(before[k], after[k]) for k in before)
