"""`dlm sweep plan`: every run of a sweep file (objective x size x budget) with its settings,
parameters, steps, tokens and data epochs, checked before anything starts.

A run's settings are what `dlm train` would be given: the sweep's shared settings, then the
objective's, then the run's own (size, budget, learning rate, run directory). Its steps come
from the same function the trainer calls (pretrain.model_spec.total_steps), so the plan and
the run cannot disagree."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from dlm_pretrain.common.config import format_value
from dlm_pretrain.common.errors import DlmError
from dlm_pretrain.data_pipeline import open_dataset, prepare_dataset
from dlm_pretrain.data_pipeline.manifest import Manifest
from dlm_pretrain.launch.launcher import hostfile_slots
from dlm_pretrain.launch.sweep.config import SweepConfig
from dlm_pretrain.launch.sweep.tables import markdown_table
from dlm_pretrain.launch.train import DEFAULT_DATA, load_run_config, needs_default_data
from dlm_pretrain.parallel.config import ModelConfig, parameter_count
from dlm_pretrain.pretrain.model_spec import flops_per_sequence, total_steps

PLAN_CSV, PLAN_MARKDOWN = "plan.csv", "plan.md"


@dataclass(frozen=True)
class PlannedRun:
    name: str  # objective-size-budget, also the run directory's name
    objective: str  # the sweep's label (several labels may share an objective)
    size: str
    budget: float  # training FLOPs
    convention: str  # how the FLOPs are counted (train.flops_convention)
    settings: tuple[str, ...]  # `dlm train` key=value settings
    run_dir: Path
    parameters: int  # the whole model, on the tokenizer's vocabulary
    non_embedding: int  # less the input embedding (the paper's convention, its x axis)
    steps: int
    flops: float  # what the steps spend, under the run's FLOPs convention (<= budget)
    tokens: int
    epochs: float  # passes over the training split
    hours: float | None  # at the sweep's throughput, when one is given
    problems: tuple[str, ...]  # why the run cannot start as planned

    @property
    def tokens_per_parameter(self) -> float:
        return self.tokens / self.non_embedding


def run_name(objective: str, size: str, budget: float) -> str:
    """E.g. mdlm-113M-6e18: the budget with three significant digits."""
    return f"{objective}-{size}-" + re.sub(r"e\+?0*", "e", f"{budget:.3g}")


def plan_sweep(sweep: SweepConfig, prepare_data: bool = False) -> list[PlannedRun]:
    """Every run, in launch order: budgets, then objectives, then sizes (the smallest runs of
    every objective finish first, so partial results are already comparable). With
    `prepare_data` the embedded default dataset is prepared if it is the runs' and missing,
    as `dlm train` does."""
    world = _world_size(sweep)
    if prepare_data:
        path = load_run_config(None, _items(sweep.settings)).data.path
        if needs_default_data(path):
            print(f"preparing the embedded default dataset in {DEFAULT_DATA.out} (once)")
            prepare_dataset(DEFAULT_DATA)
    return [
        _plan_run(sweep, label, size, budget, world)
        for budget in sorted(sweep.budgets)
        for label in sweep.objectives
        for size in sweep.sizes
    ]


def refusals(runs: list[PlannedRun]) -> list[str]:
    return [f"{run.name}: {problem}" for run in runs for problem in run.problems]


def _world_size(sweep: SweepConfig) -> int:
    backend = sweep.backend
    if backend.kind == "hostfile":
        return sum(hostfile_slots(backend.hostfile).values())
    return backend.nproc


def _plan_run(sweep: SweepConfig, label: str, size: str, budget: float, world: int) -> PlannedRun:
    name = run_name(label, size, budget)
    run_dir = Path(sweep.runs_dir) / name
    shared = [*_items(sweep.settings), *_items(sweep.objectives[label])]
    base = load_run_config(None, [*shared, f"model.size={size}"])
    manifest = _manifest(base.data.path)
    model = ModelConfig.preset(
        size, vocab_size=manifest.tokenizer["vocab_size"], seq_len=manifest.seq_len
    )
    parameters = parameter_count(model)
    non_embedding = parameters - model.vocab_size * model.hidden_size
    lr = sweep.lr.peak(non_embedding)
    settings = (
        *shared,
        f"model.size={size}",
        "train.steps=0",
        f"train.flops_budget={budget!r}",
        f"optim.lr={lr:.6g}",
        f"optim.min_lr={lr * sweep.lr.min_lr_ratio:.6g}",
        f"train.run_dir={run_dir}",
    )
    problems, steps, flops = [], 0, 0.0
    cfg = load_run_config(None, list(settings))
    try:
        cfg.check_world_size(world)
    except DlmError as e:
        problems.append(str(e))
    try:
        steps = total_steps(cfg, manifest)
        flops = float(steps * cfg.train.global_batch * flops_per_sequence(cfg, manifest))
    except DlmError as e:
        problems.append(str(e))
    tokens = steps * cfg.train.global_batch * manifest.seq_len
    epochs = tokens / _train_tokens(manifest)
    if steps and steps < sweep.checks.min_steps:
        problems.append(
            f"{steps} steps, fewer than checks.min_steps={sweep.checks.min_steps}: too short for "
            "its schedule; raise the budget, lower train.global_batch or drop the size"
        )
    if epochs > sweep.checks.max_epochs:
        problems.append(
            f"{epochs:.2f} epochs of the data, more than checks.max_epochs="
            f"{sweep.checks.max_epochs:g}: repeated data biases the comparison; use more data "
            "or a smaller budget"
        )
    return PlannedRun(
        name=name,
        objective=label,
        size=size,
        budget=budget,
        convention=cfg.train.flops_convention,
        settings=settings,
        run_dir=run_dir,
        parameters=parameters,
        non_embedding=non_embedding,
        steps=steps,
        flops=flops,
        tokens=tokens,
        epochs=epochs,
        hours=budget / sweep.throughput / 3600 if sweep.throughput else None,
        problems=tuple(problems),
    )


def _items(settings: dict[str, object]) -> list[str]:
    return [f"{key}={format_value(value)}" for key, value in settings.items()]


@cache
def _manifest(path: str) -> Manifest:
    return open_dataset(path)


def _train_tokens(manifest: Manifest) -> int:
    return manifest.splits["train"].sequences * manifest.seq_len


# (CSV column, markdown header, how the markdown shows it)
COLUMNS = (
    ("run", "run", str),
    ("objective", "objective", str),
    ("size", "size", str),
    ("non_embedding_params", "non-embedding params", "{:,}".format),
    ("params", "params", "{:,}".format),
    ("budget_flops", "budget (FLOPs)", "{:.3g}".format),
    ("steps", "steps", "{:,}".format),
    ("tokens", "tokens", "{:,}".format),
    ("tokens_per_param", "tokens/param", "{:.1f}".format),
    ("epochs", "epochs", "{:.3f}".format),
    ("est_hours", "est. hours", lambda h: "" if h == "" else f"{h:.2f}"),
    ("problems", "problems", str),
)


def _record(run: PlannedRun) -> tuple[object, ...]:
    hours = "" if run.hours is None else run.hours
    return (
        run.name,
        run.objective,
        run.size,
        run.non_embedding,
        run.parameters,
        run.budget,
        run.steps,
        run.tokens,
        run.tokens_per_parameter,
        run.epochs,
        hours,
        "; ".join(run.problems),
    )


def plan_table(runs: list[PlannedRun]) -> str:
    """The plan as a markdown table, as `dlm sweep plan` prints it."""
    rows = [
        tuple(show(value) for (_, _, show), value in zip(COLUMNS, _record(run), strict=True))
        for run in runs
    ]
    return markdown_table(tuple(header for _, header, _ in COLUMNS), rows)


def write_plan(runs: list[PlannedRun], runs_dir: Path) -> tuple[Path, Path]:
    """plan.csv (full-precision numbers) and plan.md (the printed table) in runs_dir."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = runs_dir / PLAN_CSV, runs_dir / PLAN_MARKDOWN
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([name for name, _, _ in COLUMNS])
        writer.writerows(_record(run) for run in runs)
    md_path.write_text(plan_table(runs))
    return csv_path, md_path
