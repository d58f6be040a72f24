"""Run integrity across restarts: a restart that changes what the run is stops before any
work, allowed changes are recorded as revisions (config.yaml, MLflow, the learning-rate
schedule), and after any number of kills the records describe the whole run once."""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dlm_pretrain.common.errors import CheckpointError, ConfigError
from dlm_pretrain.pretrain.config import OptimConfig, RunConfig, load_config
from dlm_pretrain.pretrain.engine import lr_multiplier
from dlm_pretrain.pretrain.revisions import (
    FIXED,
    IDENTITY,
    TOTAL_STEPS,
    first_start,
    restart,
    run_settings,
)
from dlm_pretrain.pretrain.run_records import RunRecords, read_records, sample_path
from dlm_pretrain.pretrain.tracking import Tracker
from test_train import KILL_AT, _launch, _losses, _overrides, _train

# --- revisions: what a restart may change ----------------------------------------------------


def _settings(*overrides: str) -> dict:
    cfg = load_config(None, list(overrides))
    resolved = {"data.seq_len": 128, "data.tokenizer_sha256": "ab" * 32, "train.dtype": "float32"}
    return run_settings(cfg.flat(), {**resolved, TOTAL_STEPS: cfg.train.steps})


def test_every_classified_setting_is_a_key_of_the_config():
    keys = set(RunConfig().flat())
    for entry in (*FIXED, *IDENTITY):
        assert entry in keys or any(k.startswith(entry + ".") for k in keys), entry


def test_an_unchanged_restart_adds_no_revision():
    history = first_start(_settings())
    again, revision = restart(history, _settings(), step=40)
    assert revision is None and again.revisions == history.revisions


def test_a_changed_objective_is_refused_naming_the_field_and_the_ways_out():
    saved = first_start(_settings())
    with pytest.raises(ConfigError) as error:
        restart(saved, _settings("objective.name=duo", "optim.lr=3e-4"), step=40)
    message = str(error.value)
    assert "objective.name: saved 'mdlm', requested 'duo'" in message
    assert "optim.lr: saved 0.001, requested 0.0003" in message
    assert "new run directory" in message
    assert "train.allow_changes=[objective.name,optim.lr]" in message


@pytest.mark.parametrize("allowed", [("objective.name", "optim"), ("objective", "optim.lr")])
def test_an_allowed_identity_change_is_a_revision_at_the_restart_step(allowed):
    saved = first_start(_settings())
    requested = _settings("objective.name=duo", "optim.lr=3e-4", "train.log_every=5")
    history, revision = restart(saved, requested, step=40, allowed=allowed)
    assert revision.step == 40 and revision.total_steps == 120
    assert revision.changes == {
        "objective.name": ["mdlm", "duo"],
        "optim.lr": [0.001, 0.0003],
        "train.log_every": [10, 5],
    }
    assert revision.allowed == sorted(allowed)
    assert history.revisions == [*saved.revisions, revision]
    assert history.settings == requested


def test_a_key_added_to_the_config_since_the_checkpoint_takes_its_default():
    """A checkpoint of an earlier version lacks newer keys: at their default they are no
    change; keys the config no longer has are ignored."""
    settings = _settings()
    older = {k: v for k, v in settings.items() if k != "objective.gamma"}
    older["objective.retired_option"] = 3
    saved = first_start(older)
    assert restart(saved, settings, step=4, defaults=_settings())[1] is None
    with pytest.raises(ConfigError, match=re.escape("objective.gamma: saved 1.0")):
        restart(saved, _settings("objective.gamma=0.5"), step=4, defaults=_settings())


def test_a_fixed_setting_cannot_change_even_when_allowed():
    saved = first_start(_settings())
    with pytest.raises(
        ConfigError, match=re.escape("model.size: saved 'cpu-small', requested 'tiny'")
    ):
        restart(saved, _settings("model.size=tiny"), step=4)
    with pytest.raises(ConfigError, match="only identity settings need allowing"):
        load_config(None, ["train.allow_changes=[model.size]"])


def test_more_steps_are_recorded_and_fewer_than_done_are_refused():
    saved = first_start(_settings("train.steps=24"))
    history, revision = restart(saved, _settings("train.steps=30"), step=24)
    assert revision.changes == {"train.steps": [24, 30], TOTAL_STEPS: [24, 30]}
    assert history.schedule == [(0, 24), (24, 30)]
    with pytest.raises(ConfigError, match=r"at step 24 .* give at least 24"):
        restart(saved, _settings("train.steps=20"), step=24)


# --- the learning-rate schedule across revisions ---------------------------------------------

OPTIM = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_fraction=0.1, min_warmup_steps=0)


def _one_schedule(step: int, total: int) -> float:
    """The warmup-cosine multiplier of a run never extended, in float64 (docs/algorithms.md
    §6.3), written independently of lr_multiplier."""
    warmup = max(int(0.1 * total), 0)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return 0.1 + 0.9 * (1 + math.cos(math.pi * progress)) / 2


def test_one_revision_is_the_plain_warmup_cosine():
    for step in range(0, 130):
        assert lr_multiplier(step, [(0, 100)], OPTIM) == pytest.approx(_one_schedule(step, 100))


def test_an_extension_after_warmup_bends_the_decay_without_a_jump():
    """Extended at step 60 from 100 to 200 steps: the same up to 60, continuous at 60, then
    strictly decreasing to min_lr at 200 and flat after."""
    schedule = [(0, 100), (60, 200)]
    for step in range(61):
        assert lr_multiplier(step, schedule, OPTIM) == _one_schedule(step, 100)
    after = [lr_multiplier(s, schedule, OPTIM) for s in range(60, 220)]
    assert after[0] == _one_schedule(60, 100)
    assert all(b < a for a, b in itertools.pairwise(after[:141]))
    assert after[140] == pytest.approx(0.1) and after[-1] == pytest.approx(0.1)
    # half way between the bend and the end: half way between its value there and min_lr
    assert after[70] == pytest.approx(0.1 + (after[0] - 0.1) / 2)


def test_an_extension_during_warmup_is_the_schedule_planned_for_the_new_total():
    """The warmup length stays the first total's (10 steps of 100); from then on it is the
    cosine a run planned for 200 steps with that warmup follows."""
    schedule = [(0, 100), (5, 200)]
    planned = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_fraction=0.0, min_warmup_steps=10)
    for step in range(0, 210):
        expected = lr_multiplier(step, [(0, 200)], planned)
        assert lr_multiplier(step, schedule, OPTIM) == pytest.approx(expected)


def test_a_revision_that_keeps_the_total_changes_nothing():
    """A restart that only changed the cadence or the layout: the schedule of a run never
    restarted, bit for bit."""
    for step in range(0, 130):
        plain = lr_multiplier(step, [(0, 100)], OPTIM)
        assert lr_multiplier(step, [(0, 100), (30, 100), (60, 100)], OPTIM) == plain


def test_an_extension_of_a_finished_run_stays_at_min_lr():
    schedule = [(0, 100), (100, 150)]
    assert all(lr_multiplier(s, schedule, OPTIM) == pytest.approx(0.1) for s in range(100, 151))


# --- the records, cut back to a checkpoint ---------------------------------------------------


def test_records_rewind_to_the_checkpoint_and_drop_a_line_cut_by_a_kill(tmp_path):
    records = RunRecords(tmp_path, None)
    records.rewind()
    for step in range(1, 7):
        records.add_step(step, 1.0 / step, 0.5)
        if step % 3 == 0:
            records.add_validation(step, 2.0 / step)
            sample_path(tmp_path, step).write_text("sample")
    with open(tmp_path / "train_log.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # killed inside the write
    again = RunRecords(tmp_path, 4)
    assert again.curves()["validation (ELBO)"] == [(3, 2.0 / 3)]
    assert again.curves()["train (objective)"] == [(s, 1.0 / s) for s in range(1, 5)]
    again.rewind()
    assert [r["step"] for r in read_records(tmp_path / "train_log.jsonl")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step00000003.txt"]
    RunRecords(tmp_path, None).rewind()
    assert read_records(tmp_path / "train_log.jsonl") == []
    assert read_records(tmp_path / "val_log.jsonl") == []


def test_records_written_before_rewinding_keep_the_last_value_of_a_redone_step(tmp_path):
    lines = [{"step": s, "loss": float(s), "grad_norm": 1.0} for s in (1, 2, 3, 2, 3, 4)]
    lines[3]["loss"] = 20.0
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = RunRecords(tmp_path, 3)
    assert records.curves()["train (objective)"] == [(1, 1.0), (2, 20.0), (3, 3.0)]


def test_a_damaged_record_in_the_middle_is_named(tmp_path):
    (tmp_path / "train_log.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(
        CheckpointError, match=re.escape("train_log.jsonl line 2 is not a JSON record")
    ):
        read_records(tmp_path / "train_log.jsonl")


# --- the MLflow run of a run directory --------------------------------------------------------


def _tracker(tmp_path: Path, experiment: str, last_step: int | None) -> Tracker:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, experiment, tmp_path / "run", True, rewind=True, last_step=last_step)
    assert tracker.active, "the tracker turned itself off"
    return tracker


def test_a_run_id_the_store_lacks_starts_a_new_run(tmp_path):
    """The run directory moved, or tracking.uri changed: a new MLflow run, tracking on, and
    nothing left active after close."""
    import mlflow

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mlflow_run_id").write_text("0" * 32)
    tracker = _tracker(tmp_path, "dlm", last_step=4)
    assert tracker.run_id != "0" * 32
    assert (tmp_path / "run" / "mlflow_run_id").read_text() == tracker.run_id
    tracker.close()
    assert mlflow.active_run() is None


def test_a_run_stays_in_its_experiment_and_survives_mlflow_gc(tmp_path):
    """A restart without a checkpoint replaces the MLflow run; `mlflow gc` then removes the
    replaced run for good, and the next restarts (with another tracking.experiment) go on
    with the same run in its own experiment."""
    from mlflow.tracking import MlflowClient

    (tmp_path / "run").mkdir()
    first = _tracker(tmp_path, "sweep", last_step=None)
    first.log_metrics({"train/loss": 1.0}, 1)
    first.close()
    second = _tracker(tmp_path, "sweep", last_step=None)  # killed before any checkpoint
    second.log_metrics({"train/loss": 1.5}, 1)
    second.close()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gc = [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", uri]
    subprocess.run(gc, check=True, capture_output=True, timeout=120)
    with pytest.raises(Exception, match="not found"):
        MlflowClient(uri).get_run(first.run_id)
    third = _tracker(tmp_path, "renamed", last_step=1)
    assert third.run_id == second.run_id
    third.log_metrics({"train/loss": 1.25}, 2)
    third.close()
    history = MlflowClient(uri).get_metric_history(second.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 1.25)]


# --- restarts of a real run ------------------------------------------------------------------

SHORT = (
    "train.steps=3",
    "train.checkpoint_every=1",
    "train.val_every=100",
    "train.log_every=1",
    "optim.min_warmup_steps=1",
)


@pytest.fixture(scope="module")
def three_steps(dataset, tmp_path_factory) -> Path:
    return _train(dataset, tmp_path_factory.mktemp("restarts") / "mdlm", *SHORT)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    """The run directory and its MLflow store (beside it), to restart without touching the
    module's own."""
    import shutil

    shutil.copytree(run_dir.parent, tmp_path / "copy")
    return tmp_path / "copy" / run_dir.name


def test_a_restart_with_another_objective_stops_before_any_work(dataset, three_steps, tmp_path):
    run_dir = _copy(three_steps, tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(
        ConfigError, match=re.escape("objective.name: saved 'mdlm', requested 'duo'")
    ):
        _train(dataset, run_dir, *SHORT, "train.steps=5", "objective.name=duo")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_an_allowed_objective_change_and_more_steps_are_revisions(
    dataset, three_steps, tmp_path, caplog
):
    """A 3-step MDLM run as if killed after step 2's checkpoint, continued as Duo to step 5:
    config.yaml keeps both revisions with their step, MLflow tags the second and holds each
    step once, and the learning rate bends at step 2 as the log announces."""
    from mlflow.tracking import MlflowClient

    run_dir = _copy(three_steps, tmp_path)
    (run_dir / "checkpoints" / "latest").write_text("step00000002")
    allow = "train.allow_changes=[objective.name,optim.lr]"
    change = ("objective.name=duo", "optim.lr=1e-3", allow, "train.steps=5")
    with caplog.at_level(logging.INFO, logger="dlm_pretrain"):
        _train(dataset, run_dir, *SHORT, *change)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["objective"]["name"] == "duo"
    # kept while no checkpoint holds the revision: the same command works after a kill
    assert saved["train"]["allow_changes"] == ["objective.name", "optim.lr"]
    first, second = saved["revisions"]
    assert first == {"step": 0, "total_steps": 3, "changes": {}, "allowed": []}
    assert second["step"] == 2 and second["allowed"] == ["objective.name", "optim.lr"]
    assert second["changes"]["objective.name"] == ["mdlm", "duo"]
    assert second["changes"]["train.steps"] == [3, 5]
    assert load_config(str(run_dir / "config.yaml"), []).objective.name == "duo"  # a preset
    assert "follows a cosine down to optim.min_lr=0.0001 at step 5, without a jump" in caplog.text
    assert list(_losses(run_dir)) == [1, 2, 3, 4, 5]

    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text()
    tags = client.get_run(run_id).data.tags
    assert tags["dlm.revision.1"].startswith("step 2: objective.name: 'mdlm' -> 'duo'")
    assert client.get_run(run_id).data.params["objective.name"] == "mdlm"  # the first start's
    history = client.get_metric_history(run_id, "train/lr")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]  # step 3 of the first run is gone
    first = load_config("default", _overrides(dataset, run_dir, *SHORT)).optim
    then = first.model_copy(update={"lr": 1e-3})  # the allowed change takes effect
    for step, lr in ((m.step, m.value) for m in history):  # after step s: update s + 1's rate
        optim, schedule = (first, [(0, 3)]) if step <= 2 else (then, [(0, 3), (2, 5)])
        assert lr == pytest.approx(optim.lr * lr_multiplier(step, schedule, optim))


def test_a_checkpoint_without_run_settings_restarts_with_a_warning(
    dataset, three_steps, tmp_path, caplog
):
    """Checkpoints saved before run settings were recorded continue, unchecked this once; the
    MLflow run, which holds nothing after the checkpoint, is continued, not replaced."""
    run_dir = _copy(three_steps, tmp_path)
    mlflow_run = (run_dir / "mlflow_run_id").read_text()
    meta_file = run_dir / "checkpoints" / "step00000003" / "dlm_meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["run"]
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="dlm_pretrain"):
        _train(dataset, run_dir, *SHORT, "train.steps=4")
    assert "predates recorded run settings" in caplog.text
    assert list(_losses(run_dir)) == [1, 2, 3, 4]
    assert (run_dir / "mlflow_run_id").read_text() == mlflow_run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["revisions"]
    assert saved == [{"step": 0, "total_steps": 4, "changes": {}, "allowed": []}]


# A run killed twice against the same run never interrupted: validation every 3 steps and a
# checkpoint every 4, killed once step 3's validation is recorded (no checkpoint yet: the
# restart begins again) and once step 6's is (the restart continues from step 4).
KILLED = ("train.steps=12", "train.checkpoint_every=4", "train.val_every=3", "train.log_every=1")


def _process(dataset: Path, run_dir: Path, *entry: str) -> list[str]:
    entry = entry or ("-m", "dlm_pretrain.launch.train")
    return [sys.executable, *entry, "default", *_overrides(dataset, run_dir, *KILLED)]


def _mlflow_history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric's (step, value) in logged order; tokens/s is a timing (steps only)."""
    history = {}
    for key in client.get_run(run_id).data.metrics:
        points = client.get_metric_history(run_id, key)
        timing = key == "train/tokens_per_s"
        history[key] = [(m.step, None if timing else m.value) for m in points]
    return history


@pytest.mark.slow
def test_a_run_killed_twice_records_the_whole_run_once(dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _launch(_process(dataset, straight), straight).wait(timeout=300) == 0
    for step in (3, 6):
        proc = _launch(_process(dataset, killed, KILL_AT, f"validated:{step}"), killed)
        assert proc.wait(timeout=300) < 0
        assert json.loads((killed / "val_log.jsonl").read_text().splitlines()[-1])["step"] == step
    assert _launch(_process(dataset, killed), killed).wait(timeout=300) == 0
    assert (tmp_path / "killed.log").read_text().count("resumed from step 4") == 1

    for name in ("train_log.jsonl", "val_log.jsonl"):
        assert (killed / name).read_text() == (straight / name).read_text(), name
    assert list(_losses(killed)) == list(range(1, 13))
    assert (killed / "loss_curve.png").read_bytes() == (straight / "loss_curve.png").read_bytes()
    assert sorted(p.name for p in (killed / "samples").iterdir()) == sorted(
        p.name for p in (straight / "samples").iterdir()
    )

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    killed_id = (killed / "mlflow_run_id").read_text()
    straight_id = (straight / "mlflow_run_id").read_text()
    assert _mlflow_history(client, killed_id) == _mlflow_history(client, straight_id)
    experiment = client.get_run(killed_id).info.experiment_id
    active = client.search_runs([experiment], "attributes.run_name = 'killed'")
    assert [r.info.run_id for r in active] == [killed_id]  # the replaced ones are deleted
    samples = {a.path for a in client.list_artifacts(killed_id, "samples")}
    assert samples == {f"samples/step{s:08d}.txt" for s in (0, 3, 6, 9, 12)}
