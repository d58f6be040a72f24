"""`dlm sweep status`: where each planned run stands, from its run directory (the checkpoint
step, the freshness of its step log) and from MLflow (validation loss, tokens/s)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from dlm_pretrain.launch.sweep.config import SweepConfig, tracking_target
from dlm_pretrain.launch.sweep.plan import PlannedRun
from dlm_pretrain.launch.sweep.runner import PARENT_ID_FILE, trained_steps
from dlm_pretrain.launch.sweep.tables import markdown_table
from dlm_pretrain.pretrain.tracking import sweep_children

STEP_LOG = "train_log.jsonl"  # the trainer appends a line per step
STALE_S = 900  # a step log untouched this long: the run is not running


@dataclass(frozen=True)
class RunStatus:
    run: PlannedRun
    state: str  # done | running | stopped | pending
    step: int  # the latest step logged (checkpointed, if it is not running)
    val_loss: float | None
    tokens_per_s: float | None

    @property
    def eta_s(self) -> float | None:
        if self.state != "running" or not self.tokens_per_s:
            return None
        return (self.run.steps - self.step) * self.run.tokens / self.run.steps / self.tokens_per_s


def sweep_status(sweep: SweepConfig, runs: list[PlannedRun]) -> list[RunStatus]:
    children = {child["name"]: child for child in _children(sweep)}
    return [_status(run, children.get(run.name)) for run in runs]


def with_measured_hours(sweep: SweepConfig, runs: list[PlannedRun]) -> list[PlannedRun]:
    """The runs with their hours re-estimated from the training FLOP/s that runs of the same
    objective and size have reached so far (their MLflow tokens/s); the others keep the
    estimate from the sweep's `throughput`."""
    rates = {}
    children = {child["name"]: child for child in _children(sweep)}
    for run in runs:
        tokens_per_s = children.get(run.name, {}).get("metrics", {}).get("train/tokens_per_s")
        if tokens_per_s and run.tokens:
            rates[run.objective, run.size] = tokens_per_s * run.flops / run.tokens
    return [
        replace(run, hours=run.flops / rates[run.objective, run.size] / 3600)
        if (run.objective, run.size) in rates
        else run
        for run in runs
    ]


def _children(sweep: SweepConfig) -> list[dict]:
    id_file = Path(sweep.runs_dir) / PARENT_ID_FILE
    if not id_file.is_file():
        return []  # not launched yet
    return sweep_children(tracking_target(sweep)[0], id_file.read_text().strip())


def _status(run: PlannedRun, child: dict | None) -> RunStatus:
    saved = trained_steps(run)
    metrics = child["metrics"] if child else {}
    logged = int(metrics.get("train/tokens", 0) * run.steps / run.tokens) if run.tokens else 0
    step_log = run.run_dir / STEP_LOG
    fresh = step_log.is_file() and time.time() - step_log.stat().st_mtime < STALE_S
    if saved >= run.steps:
        state = "done"
    elif child and child["status"] == "RUNNING" and fresh:
        state = "running"
    else:
        state = "stopped" if saved or child else "pending"
    return RunStatus(
        run=run,
        state=state,
        step=max(saved, logged) if state == "running" else saved,
        val_loss=metrics.get("val/loss"),
        tokens_per_s=metrics.get("train/tokens_per_s"),
    )


def status_table(statuses: list[RunStatus]) -> str:
    header = ("run", "state", "step", "val loss", "tokens/s", "ETA")
    rows = [
        (
            s.run.name,
            s.state,
            f"{s.step}/{s.run.steps}",
            "" if s.val_loss is None else f"{s.val_loss:.4f}",
            "" if s.tokens_per_s is None else f"{s.tokens_per_s:,.0f}",
            "" if s.eta_s is None else _duration(s.eta_s),
        )
        for s in statuses
    ]
    counts = {state: sum(s.state == state for s in statuses) for state in _STATES}
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    return markdown_table(header, rows) + f"\n{len(statuses)} runs: {summary}\n"


_STATES = ("done", "running", "stopped", "pending")


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"
