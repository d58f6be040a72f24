"""MLflow tracking from one rank, and the loss-curve plot. The only module that calls MLflow.

If the tracking store cannot be reached the run goes on: the failure is logged once and
tracking is off for the rest of the run (an explicit, documented degraded mode).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

# MLflow's defaults retry an unanswering server for minutes (each request); a tracking server
# that stops answering mid-run should cost seconds. A value set in the environment wins.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def default_tracking_uri(run_dir: str | Path) -> str:
    """One sqlite store for a whole sweep: next to the run directories."""
    return f"sqlite:///{(Path(run_dir).resolve().parent / 'mlflow.db')}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside it (MLflow's default is ./mlruns in
    whatever directory the run was started from); a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///")).resolve()  # sqlite:////abs or :///rel
    return (database.parent / "mlartifacts").as_uri()


def _check_reachable(uri: str, timeout_s: float = 3.0) -> None:
    """Fail fast on a tracking server that does not answer (MLflow itself retries for
    minutes before giving up)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
        pass


def _start_store(uri: str, experiment: str) -> None:
    """Point MLflow at the store and the experiment, creating the experiment if needed."""
    import mlflow

    for name, value in MLFLOW_HTTP_DEFAULTS.items():  # MLflow reads them per request
        os.environ.setdefault(name, value)
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=_artifact_location(uri))
    mlflow.set_experiment(experiment)


class Tracker:
    """log_params / log_metrics / log_artifact / close; a no-op on ranks other than 0."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_dir: Path,
        active: bool,
        parent_run_id: str = "",
        tags: dict[str, str] | None = None,
    ) -> None:
        self.run_dir, self.active, self.uri = run_dir, active, uri
        self.run_id, self.resumed = None, False
        if not active:
            return
        self._call(self._start, experiment, parent_run_id, tags or {})

    def _start(self, experiment: str, parent_run_id: str, tags: dict[str, str]) -> None:
        """A new run (a child of `parent_run_id`, as a sweep's runs are), or the one this run
        directory started before."""
        import mlflow

        _start_store(self.uri, experiment)
        id_file = self.run_dir / "mlflow_run_id"
        resume_id = id_file.read_text().strip() if id_file.is_file() else None
        run = mlflow.start_run(
            run_id=resume_id,
            run_name=self.run_dir.name,
            parent_run_id=None if resume_id else parent_run_id or None,
            tags=tags,
        )
        self.run_id, self.resumed = run.info.run_id, resume_id is not None
        id_file.write_text(self.run_id)

    def _call(self, fn, *args) -> None:
        if not self.active:
            return
        try:
            fn(*args)
        except Exception as e:  # any store failure: keep training, say so once
            log.warning(
                "MLflow tracking at %s failed (%s); continuing without tracking", self.uri, e
            )
            self.active = False

    def log_params(self, params: dict) -> None:
        """Params of a new run; a resumed run keeps its first values (MLflow forbids changing
        them) and records the values it resumed with as tags."""
        import mlflow

        values = {k: str(v)[:500] for k, v in params.items()}
        if self.resumed:
            self._call(lambda: mlflow.set_tags({f"resumed.{k}": v for k, v in values.items()}))
        else:
            self._call(lambda: mlflow.log_params(values))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import mlflow

        self._call(lambda: mlflow.log_metrics(metrics, step=step))

    def log_artifact(self, path: Path) -> None:
        import mlflow

        self._call(lambda: mlflow.log_artifact(str(path)))

    def close(self) -> None:
        import mlflow

        self._call(mlflow.end_run)


def sweep_parent_run(uri: str, experiment: str, name: str, id_file: Path, tags: dict) -> str:
    """The MLflow run a sweep's runs are children of: the one `id_file` names, or a new one
    (its id then written there). Raises if the store cannot be reached: a sweep must not start
    runs it cannot find again."""
    import mlflow

    _start_store(uri, experiment)
    if id_file.is_file():
        return id_file.read_text().strip()
    with mlflow.start_run(run_name=name, tags={"sweep": name, **tags}) as run:
        id_file.write_text(run.info.run_id)
    return run.info.run_id


def sweep_children(uri: str, parent_run_id: str) -> list[dict]:
    """Every child of the sweep's parent run: its name, status, tags and latest metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return [
        {
            "name": run.info.run_name,
            "status": run.info.status,
            "tags": run.data.tags,
            "metrics": run.data.metrics,
        }
        for run in runs
    ]


def log_to_run(uri: str, run_id: str, artifacts: list[Path], artifact_path: str) -> None:
    """Files attached to a finished run (a sweep's fits on its parent run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path)


def plot_losses(history: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Train and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in history.items():
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(
                steps, values, label=name, marker="o" if name.startswith("validation") else None
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
