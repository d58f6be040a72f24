"""The MLflow tracker: its HTTP retry defaults."""

from __future__ import annotations

import os

import pytest
from dlm_pretrain.pretrain.tracking import MLFLOW_HTTP_DEFAULTS, Tracker


@pytest.mark.parametrize("user_value", [None, "7"], ids=["unset", "user's own"])
def test_a_started_tracker_sets_mlflow_http_defaults_unless_the_user_did(
    tmp_path, monkeypatch, user_value
):
    """MLflow retries an unanswering server for minutes per request by default; the Tracker
    shortens that where it starts (it was done in the CLI's logging set-up, so a run started
    from Python kept MLflow's defaults). A value the user exported wins."""
    for name in MLFLOW_HTTP_DEFAULTS:
        monkeypatch.setenv(name, "placeholder")  # restored (removed) after the test
        if user_value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, user_value)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "test", tmp_path, active=True)
    assert tracker.active, "the sqlite store should start"
    tracker.close()
    for name, default in MLFLOW_HTTP_DEFAULTS.items():
        assert os.environ[name] == (user_value or default)
