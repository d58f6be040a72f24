"""`dlm sweep fit`: the final validation losses of the sweep's finished runs, from MLflow, fitted
(launch.sweep.fit) and reported as PNGs and tables beside the runs and on the parent run."""

from __future__ import annotations

from pathlib import Path

from dlm_pretrain.common.errors import DataError
from dlm_pretrain.launch.sweep.config import SweepConfig, tracking_target
from dlm_pretrain.launch.sweep.fit import RunResult, fit_sweep
from dlm_pretrain.launch.sweep.fit_report import write_fit_report
from dlm_pretrain.launch.sweep.plan import PlannedRun
from dlm_pretrain.launch.sweep.runner import PARENT_ID_FILE, is_done
from dlm_pretrain.pretrain.tracking import log_to_run, sweep_children


def final_results(sweep: SweepConfig, runs: list[PlannedRun]) -> list[RunResult]:
    """One result per finished run: its objective label, budget, non-embedding parameters
    and the validation loss MLflow holds last (the trainer validates at the final step)."""
    id_file = Path(sweep.runs_dir) / PARENT_ID_FILE
    if not id_file.is_file():
        raise DataError(f"{sweep.runs_dir} holds no launched sweep; run `dlm sweep launch` first")
    losses = {
        child["name"]: child["metrics"].get("val/loss")
        for child in sweep_children(tracking_target(sweep)[0], id_file.read_text().strip())
    }
    return [
        RunResult(run.objective, run.budget, run.non_embedding, losses[run.name])
        for run in runs
        if is_done(run) and losses.get(run.name) is not None
    ]


def fit_and_report(sweep: SweepConfig, runs: list[PlannedRun], out_dir: Path) -> str:
    """Fit the finished runs, write the report to `out_dir`, attach it to the parent run and
    return the markdown summary."""
    results = final_results(sweep, runs)
    missing = len(runs) - len(results)
    fit = fit_sweep(results)
    files = write_fit_report(fit, out_dir)
    parent = (Path(sweep.runs_dir) / PARENT_ID_FILE).read_text().strip()
    log_to_run(tracking_target(sweep)[0], parent, files, "scaling_fit")
    summary = next(path for path in files if path.suffix == ".md").read_text()
    note = f"\n{missing} planned run(s) not finished yet, left out of the fit\n" if missing else ""
    listing = "\n".join(f"  {path}" for path in files)
    return f"{summary}{note}\nwrote (and logged to the sweep's MLflow parent run):\n{listing}"
