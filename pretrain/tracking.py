"""MLflow tracking from one rank, and the loss-curve plot. The only module that calls MLflow.

If the tracking store cannot be reached the run goes on: the failure is logged once and
tracking is off for the rest of the run (an explicit, documented degraded mode).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from dlm_pretrain.common.files import write_atomic
from dlm_pretrain.pretrain.run_records import SAMPLES, remove_samples_after

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


def _start_store(uri: str, experiment: str) -> str:
    """Point MLflow at the store and the experiment, creating the experiment if needed;
    returns the experiment's id."""
    import mlflow

    for name, value in MLFLOW_HTTP_DEFAULTS.items():  # MLflow reads them per request
        os.environ.setdefault(name, value)
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=_artifact_location(uri))
    return mlflow.set_experiment(experiment).experiment_id


class Tracker:
    """log_params / log_metrics / log_artifact / close; a no-op on ranks other than 0.

    A run directory keeps one MLflow run (its id in RUN_DIR/mlflow_run_id). `rewind` (the
    trainer's start from the checkpoint at `last_step`, None for none) continues it when it
    holds nothing later; otherwise the steps after the checkpoint are redone, and since
    MLflow cannot delete a metric's values, the run is replaced by a copy of what survives
    (params, tags, metrics up to `last_step`, artifacts) and deleted, so that each step is in
    the history once. Without `rewind` (`dlm eval`) the run is continued as it is."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_dir: Path,
        active: bool,
        parent_run_id: str = "",
        tags: dict[str, str] | None = None,
        rewind: bool = False,
        last_step: int | None = None,
    ) -> None:
        self.run_dir, self.active, self.uri = run_dir, active, uri
        self.run_id, self.resumed = None, False
        if not active:
            return
        self._call(self._start, experiment, parent_run_id, tags or {}, rewind, last_step)

    def _start(
        self,
        experiment: str,
        parent_run_id: str,
        tags: dict[str, str],
        rewind: bool,
        last_step: int | None,
    ) -> None:
        """The run this directory's records continue (see the class), or a new one (a child
        of `parent_run_id`, as a sweep's runs are)."""
        import mlflow

        experiment_id = _start_store(self.uri, experiment)
        id_file = self.run_dir / "mlflow_run_id"
        previous = _stored_run(id_file.read_text().strip()) if id_file.is_file() else None
        resume_id, replaces = None, {}
        if previous is not None:
            _stay_in_experiment(previous, experiment_id)
            resume_id = _surviving_run(previous, last_step) if rewind else previous.info.run_id
            replaces = {} if resume_id else {REPLACES_TAG: previous.info.run_id}
        run = mlflow.start_run(
            run_id=resume_id,
            run_name=self.run_dir.name,
            parent_run_id=None if resume_id else parent_run_id or None,
            tags={**tags, **replaces},
        )
        try:
            write_atomic(id_file, run.info.run_id.encode())
            _delete_replaced(run.info.run_id)
        except BaseException:
            mlflow.end_run("FAILED")  # not left active for the next run in this process
            raise
        self.run_id, self.resumed = run.info.run_id, resume_id is not None

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
        """The first start's settings; a continued run keeps them (MLflow forbids changing
        them: later changes are revisions, see set_revisions)."""
        import mlflow

        if not self.resumed:
            self._call(lambda: mlflow.log_params({k: str(v)[:500] for k, v in params.items()}))

    def set_revisions(self, revisions: list[str]) -> None:
        """A tag `dlm.revision.K` per revision after the first start (its step and changes);
        those of revisions a rewind undid are removed."""
        import mlflow
        from mlflow.tracking import MlflowClient

        def tag() -> None:
            client = MlflowClient()
            for key in client.get_run(self.run_id).data.tags:
                if key.startswith(REVISION_TAG) and int(key[len(REVISION_TAG) :]) >= len(revisions):
                    client.delete_tag(self.run_id, key)
            later = {f"{REVISION_TAG}{k}": text[:5000] for k, text in enumerate(revisions) if k}
            mlflow.set_tags(later)

        self._call(tag)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import mlflow

        self._call(lambda: mlflow.log_metrics(metrics, step=step))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        import mlflow

        self._call(lambda: mlflow.log_artifact(str(path), folder))

    def close(self, status: str = "FINISHED") -> None:
        import mlflow

        self._call(mlflow.end_run, status)


REVISION_TAG = "dlm.revision."
MISSING = "RESOURCE_DOES_NOT_EXIST"  # MLflow's error code for an unknown run
REPLACES_TAG = "dlm_replaces"  # on a run that replaces another (Tracker): the replaced run's id


def _stored_run(run_id: str):
    """The MLflow run `run_id` if this store holds it, not deleted; else None (a new run)."""
    run = _active_run(run_id)
    if run is None:
        log.info("MLflow run %s is not in this store (or deleted): starting a new one", run_id)
    return run


def _active_run(run_id: str):
    """The run `run_id`, or None if the store lacks it (never held it, or `mlflow gc` removed
    it) or it is deleted."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as error:
        if error.error_code != MISSING:
            raise
        return None
    return run if run.info.lifecycle_stage == "active" else None


def _stay_in_experiment(run, experiment_id: str) -> None:
    """A run continues in the experiment it started in (MLflow cannot move it)."""
    import mlflow

    if experiment_id != run.info.experiment_id:
        log.warning(
            "MLflow run %s continues in its experiment %s; tracking.experiment applies to new runs",
            run.info.run_id,
            run.info.experiment_id,
        )
        mlflow.set_experiment(experiment_id=run.info.experiment_id)


def _surviving_run(old, last_step: int | None) -> str | None:
    """`old`'s id if it holds nothing after `last_step`, else the id of a copy of what it
    holds up to `last_step`; None (start a new run) without a checkpoint."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    _delete_unfinished_copies(client, old)
    if last_step is None:
        return None
    run_id = old.info.run_id
    metrics = [m for key in old.data.metrics for m in client.get_metric_history(run_id, key)]
    if all(m.step <= last_step for m in metrics):
        return run_id
    log.info("MLflow run %s holds steps after %d: replacing it by what survives", run_id, last_step)
    return _copy_run(client, old, [m for m in metrics if m.step <= last_step], last_step)


def _copy_run(client, old, metrics: list, last_step: int) -> str:
    """A new run with `old`'s params, tags, artifacts (samples up to `last_step`) and
    `metrics`; MLflow takes at most 100 params and 1000 metrics per call."""
    from mlflow.entities import Param

    tags = {k: v for k, v in old.data.tags.items() if k != "mlflow.runName"}
    new = client.create_run(
        old.info.experiment_id,
        run_name=old.info.run_name,
        tags={**tags, REPLACES_TAG: old.info.run_id},
    )
    new_id = new.info.run_id
    params = [Param(k, v) for k, v in old.data.params.items()]
    for i in range(0, len(params), 100):
        client.log_batch(new_id, params=params[i : i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(new_id, metrics=metrics[i : i + 1000])
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(old.info.run_id, "", tmp))
        if (local / SAMPLES).is_dir():
            remove_samples_after(local / SAMPLES, last_step)
        if any(local.iterdir()):
            client.log_artifacts(new_id, str(local))
    return new_id


def _delete_unfinished_copies(client, old) -> None:
    """Copies of `old` that a kill interrupted before the run directory named them."""
    copies = client.search_runs(
        [old.info.experiment_id], f"tags.{REPLACES_TAG} = '{old.info.run_id}'"
    )
    for run in copies:
        client.delete_run(run.info.run_id)


def _delete_replaced(run_id: str) -> None:
    """The run `run_id` replaces, once the run directory names `run_id` (deleted runs are
    hidden in the UI and searches; `mlflow gc` removes them for good, after which there is
    nothing left to delete)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    replaced = client.get_run(run_id).data.tags.get(REPLACES_TAG)
    if replaced and _active_run(replaced) is not None:
        client.delete_run(replaced)


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
