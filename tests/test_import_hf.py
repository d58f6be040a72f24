"""`dlm import-hf`: an exported folder becomes a run directory that `dlm train` fine-tunes from
exactly the exported weights, at any tensor size; a damaged export writes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dlm_pretrain.checkpoints_tools.export_hf import export_hf
from dlm_pretrain.checkpoints_tools.import_hf import import_hf
from dlm_pretrain.common.errors import CheckpointError
from dlm_pretrain.pretrain.checkpoint_files import read_meta
from dlm_pretrain.pretrain.config import load_config
from dlm_pretrain.pretrain.trainer import run
from safetensors.torch import load_file
from test_train import _train


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    """Three steps and a validation in one process (float32 CPU)."""
    run_dir = tmp_path_factory.mktemp("import") / "run"
    _train(dataset, run_dir, "train.steps=3", "train.val_every=3")
    return run_dir


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    return export_hf(trained, tmp_path_factory.mktemp("export") / "hf")


def test_export_import_export_gives_identical_weights(exported, tmp_path):
    run_dir = tmp_path / "imported"
    import_hf(exported, run_dir, tensor=2)
    meta = read_meta(run_dir / "checkpoints/step00000000")
    assert (meta["format"], meta["layout"]["tensor"], meta["step"]) == ("weights", 2, 0)
    again = export_hf(run_dir, tmp_path / "again")
    first, second = (
        load_file(exported / "model.safetensors"),
        load_file(again / "model.safetensors"),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_the_imported_run_starts_from_the_exported_model(dataset, trained, exported, tmp_path):
    """Fine-tuning at tensor size 1 of an export: its first validation (before any step) equals
    the exported run's last one, and training goes on from there."""
    run_dir = tmp_path / "finetuned"
    import_hf(exported, run_dir)
    settings = [f"data.path={dataset}", "train.steps=2", "train.val_every=2"]
    run(load_config(str(run_dir / "config.yaml"), settings))
    source = read_meta(trained / "checkpoints/step00000003")["validation"]["loss"]
    tuned = read_meta(run_dir / "checkpoints/step00000002")
    assert tuned["format"] == "native" and tuned["step"] == 2
    log = (run_dir / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2]
    first = _first_validation(run_dir)
    assert abs(first - source) <= 1e-6 * source


def _first_validation(run_dir: Path) -> float:
    """The step-0 validation the trainer logs to MLflow; read back from the run's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    history = client.get_metric_history((run_dir / "mlflow_run_id").read_text(), "val/loss")
    return next(m.value for m in history if m.step == 0)


@pytest.mark.parametrize("damage", ["no config", "not ours", "truncated weights"])
def test_a_damaged_export_is_refused_and_nothing_is_written(exported, tmp_path, damage):
    folder = tmp_path / "hf"
    shutil.copytree(exported, folder)
    if damage == "no config":
        (folder / "config.json").unlink()
    elif damage == "not ours":
        config = json.loads((folder / "config.json").read_text())
        del config["dlm_run_config"]
        (folder / "config.json").write_text(json.dumps(config))
    else:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        import_hf(folder, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
