"""`dlm sweep plan | launch | status | fit | run`: argument parsing and printing; the work is
in plan, runner, slurm, status and fit beside this module."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.launch.sweep.config import load_sweep, tracking_target
from dlm_pretrain.launch.sweep.plan import PlannedRun, plan_sweep, plan_table, refusals, write_plan

FIT_DIR = "fit"  # in runs_dir: the fits' plots and tables


def add_sweep_commands(sub: argparse._SubParsersAction, add_command: Callable) -> None:
    """`dlm sweep ...`; `add_command` is the CLI's subcommand factory (shared help format)."""
    sweep = add_command(
        sub,
        "sweep",
        "plan, launch, watch and fit a FLOP-matched study (objectives x sizes x budgets)",
        "dlm sweep plan|launch|status|fit SWEEP.yaml (README: FLOP-matched studies).",
    )
    actions = sweep.add_subparsers(title="actions", required=True, metavar="ACTION")
    for name, summary, run in [
        ("plan", "print and save every run: parameters, steps, tokens, epochs, time", _plan),
        ("launch", "train every run not done yet (again after a stop: resumes)", _launch),
        ("status", "state, step, validation loss, tokens/s and ETA of every run", _status),
        ("fit", "IsoFLOP profiles, scaling laws and compute multipliers; PNGs", _fit),
    ]:
        action = add_command(actions, name, summary, f"dlm sweep {name} SWEEP.yaml")
        action.add_argument("sweep_file", type=Path, help="the sweep's YAML file")
        action.set_defaults(run=run)
        if name == "launch":
            action.add_argument(
                "--wait", action="store_true", help="slurm: return once every job has ended"
            )
    one = actions.add_parser("run")  # what each backend starts; no help: not listed
    one.add_argument("sweep_file", type=Path)
    one.add_argument("--run", required=True, dest="run_name")
    one.add_argument("--devices", default="")
    one.set_defaults(run=_run_one, verbose=False)


def _planned(sweep_file: Path, prepare_data: bool = False) -> tuple:
    sweep = load_sweep(sweep_file)
    return sweep, plan_sweep(sweep, prepare_data)


def _plan(args: argparse.Namespace) -> int:
    from dlm_pretrain.launch.sweep.status import with_measured_hours

    sweep, runs = _planned(args.sweep_file, prepare_data=True)
    runs = with_measured_hours(sweep, runs)
    print(plan_table(runs))
    csv_path, md_path = write_plan(runs, Path(sweep.runs_dir))
    flops = sum(run.flops for run in runs)
    print(f"{len(runs)} runs, {flops:.3g} training FLOPs in all; saved {csv_path}, {md_path}")
    if any(run.hours for run in runs):
        hours = sum(run.hours or 0 for run in runs)
        print(
            f"estimated {hours:.2f} run-hours, from the FLOP/s the sweep's runs have reached "
            f"where they have run, else from throughput={sweep.throughput:g} FLOP/s"
        )
    problems = refusals(runs)
    if problems:
        print(f"\n{len(problems)} problem(s); `dlm sweep launch` refuses this plan:")
        print("\n".join(f"  {p}" for p in problems))
        return 1
    return 0


def _checked(sweep_file: Path) -> tuple:
    """The sweep and its plan, refused (before anything starts) if any run has a problem."""
    sweep, runs = _planned(sweep_file, prepare_data=True)
    problems = refusals(runs)
    if problems:
        raise ConfigError(
            "the plan has problems (`dlm sweep plan` shows them all):\n  " + "\n  ".join(problems)
        )
    return sweep, runs


def _launch(args: argparse.Namespace) -> int:
    sweep, runs = _checked(args.sweep_file)
    write_plan(runs, Path(sweep.runs_dir))
    if sweep.backend.kind == "slurm":
        from dlm_pretrain.launch.sweep.slurm import launch_slurm

        return launch_slurm(args.sweep_file.resolve(), sweep, runs, wait=args.wait)
    from dlm_pretrain.launch.sweep.runner import launch_local, parent_run_id

    parent_run_id(sweep)  # one parent before the children start side by side
    return launch_local(args.sweep_file.resolve(), sweep, runs)


def _run_one(args: argparse.Namespace) -> int:
    from dlm_pretrain.launch.sweep.runner import run_one

    sweep, runs = _planned(args.sweep_file)
    run = _named(runs, args.run_name)
    devices = [int(d) for d in args.devices.split(",") if d]
    return run_one(sweep, run, devices)


def _named(runs: list[PlannedRun], name: str) -> PlannedRun:
    for run in runs:
        if run.name == name:
            return run
    raise ConfigError(f"the sweep plans no run {name!r}; its runs: {[r.name for r in runs]}")


def _status(args: argparse.Namespace) -> int:
    from dlm_pretrain.launch.sweep.status import status_table, sweep_status

    sweep, runs = _planned(args.sweep_file)
    print(status_table(sweep_status(sweep, runs)))
    print(f"MLflow: mlflow ui --backend-store-uri {tracking_target(sweep)[0]}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from dlm_pretrain.launch.sweep.results import fit_and_report

    sweep, runs = _planned(args.sweep_file)
    report = fit_and_report(sweep, runs, Path(sweep.runs_dir) / FIT_DIR)
    print(report)
    return 0
