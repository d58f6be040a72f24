"""`dlm eval`: the chosen parts for each target, printed as tables, saved as JSON (and the
Pareto as CSV and PNG), and logged to MLflow: to the run's own MLflow run when the target is
a run directory that has one, else to a new run named after the target."""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dlm_pretrain.evaluation.generation import load_judge, sample_texts, score
from dlm_pretrain.evaluation.likelihood import check_draws, dataset_likelihood
from dlm_pretrain.evaluation.options import EvalOptions, check_options
from dlm_pretrain.evaluation.pareto import ParetoPoint, mark_frontier, write_pareto
from dlm_pretrain.evaluation.speed import SpeedPoint, ar_baseline, sampling_speed
from dlm_pretrain.evaluation.target import load_target
from dlm_pretrain.pretrain.config import RunConfig, SamplingConfig
from dlm_pretrain.pretrain.objectives import AR
from dlm_pretrain.pretrain.tracking import Tracker, default_tracking_uri
from dlm_pretrain.pretrain.trained_model import TrainedModel, sampler_of

log = logging.getLogger(__name__)


@dataclass
class TargetReport:
    path: str
    objective: str
    step: int
    likelihood: dict | None = None
    generation: list[dict] = field(default_factory=list)
    speed: list[dict] = field(default_factory=list)
    tasks: dict = field(default_factory=dict)


def evaluate(targets: list[str], opts: EvalOptions) -> dict:
    """Every part for every target; returns what eval.json holds."""
    check_options(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    judge, reports, baseline, runs = None, {}, [], []
    for path in targets:
        model = load_target(path)
        if opts.likelihood:
            check_draws(model, opts.draws)
        if opts.gen_ppl and judge is None:
            judge = load_judge(opts.judge, model.runtime.device)
        reports[model.name] = _evaluate_target(model, opts, judge)
        if opts.speed and not baseline:
            baseline = [
                asdict(p) | _rate(p) for p in ar_baseline(model, _batches(opts), opts.repeats)
            ]
        runs.append((model.name, model.run_dir, model.cfg, model.step))
        del model  # one target's weights in memory at a time
    result = {"targets": {k: asdict(v) for k, v in reports.items()}, "ar_baseline": baseline}
    if opts.gen_ppl and opts.speed:
        result["pareto"] = _pareto(reports, opts)
    (opts.out / "eval.json").write_text(json.dumps(result, indent=2))
    for name, run_dir, cfg, step in runs:
        _log_to_mlflow(name, run_dir, cfg, step, _metrics(reports[name]), opts.out)
    return result


def _evaluate_target(model: TrainedModel, opts: EvalOptions, judge) -> TargetReport:
    report = TargetReport(str(model.run_dir), model.cfg.objective.name, model.step)
    if opts.likelihood:
        found = dataset_likelihood(model, opts.data or None, opts.sequences, opts.draws)
        report.likelihood = asdict(found) | {"perplexity": found.perplexity}
        log.info(
            "%s: likelihood %.4f +- %.4f nats/token",
            model.name,
            found.nats_per_token,
            found.standard_error,
        )
    if opts.gen_ppl:
        for steps, top_p, final in _settings(model, opts):
            sampling = SamplingConfig(
                steps=steps, top_p=top_p, final_step=final, num_samples=opts.samples, seed=opts.seed
            )
            scored = score(sample_texts(model, sampling, opts.batch), judge)
            setting = {"steps": steps, "top_p": top_p, "final_step": final}
            report.generation.append(setting | asdict(scored))
            log.info("%s: T=%d top_p=%g gen-PPL %.2f", model.name, steps, top_p, scored.gen_ppl)
    if opts.speed:
        report.speed = [
            asdict(p) | _rate(p)
            for p in sampling_speed(
                sampler_of(model, SamplingConfig()),
                list(opts.steps),
                _batches(opts),
                model.name,
                opts.repeats,
            )
        ]
    if opts.tasks:
        from dlm_pretrain.evaluation.harness import run_tasks

        report.tasks = run_tasks(
            model.run_dir,
            list(opts.tasks),
            opts.include_path or None,
            opts.task_draws,
            opts.limit,
        )
    return report


def _settings(model: TrainedModel, opts: EvalOptions) -> list[tuple[int, float]]:
    """(steps, top_p, final_step) settings: AR's steps are fixed by the length; AR and Eso-LM
    have no final step to choose."""
    steps = [model.seq_len - 1] if isinstance(model.objective, AR) else list(opts.steps)
    finals = opts.final_step if model.objective.has_final_step else ("default",)
    return list(itertools.product(steps, opts.top_p, finals))


def _batches(opts: EvalOptions) -> list[int]:
    return sorted({1, opts.batch})


def _rate(point: SpeedPoint) -> dict:
    return {"tokens_per_s": point.tokens_per_s}


def _pareto(reports: dict[str, TargetReport], opts: EvalOptions) -> list[dict]:
    """gen-PPL at the first --top-p and --final-step against tokens/s at the largest batch."""
    points = []
    for name, report in reports.items():
        rates = {p["steps"]: p["tokens_per_s"] for p in report.speed if p["batch"] == opts.batch}
        for g in report.generation:
            first = g["top_p"] == opts.top_p[0] and g["final_step"] in (
                opts.final_step[0],
                "default",
            )
            if first and g["steps"] in rates:
                points.append(ParetoPoint(name, g["steps"], rates[g["steps"]], g["gen_ppl"]))
    points = mark_frontier(points)
    if points:
        write_pareto(points, opts.out)
    return [asdict(p) for p in points]


def _metrics(report: TargetReport) -> dict[str, float]:
    metrics = {}
    if report.likelihood:
        metrics["eval/nll"] = report.likelihood["nats_per_token"]
        metrics["eval/nll_se"] = report.likelihood["standard_error"]
    for g in report.generation:
        tag = f"T{g['steps']}_p{g['top_p']:g}_{g['final_step']}"
        metrics[f"eval/gen_ppl/{tag}"] = g["gen_ppl"]
        metrics[f"eval/entropy/{tag}"] = g["entropy"]
    for p in report.speed:
        tag = f"T{p['steps']}_b{p['batch']}"
        metrics[f"eval/tokens_per_s/{tag}"] = p["tokens_per_s"]
        metrics[f"eval/latency_s/{tag}"] = p["seconds"]
    for task, values in report.tasks.items():
        metrics |= {f"eval/{task}/{k}": v for k, v in values.items()}
    return metrics


def _log_to_mlflow(
    name: str, run_dir: Path, cfg: RunConfig, step: int, metrics: dict[str, float], out: Path
) -> None:
    """The run's own MLflow run if it has one, else a new run kept in OUT/NAME; eval.json
    attached."""
    own = (run_dir / "mlflow_run_id").is_file()
    if not own:
        run_dir = out / name
        run_dir.mkdir(parents=True, exist_ok=True)
    uri = cfg.tracking.uri or default_tracking_uri(run_dir)
    tracker = Tracker(uri, cfg.tracking.experiment, run_dir, active=True)
    tracker.log_metrics(metrics, step)
    tracker.log_artifact(out / "eval.json")
    tracker.close()


def print_tables(result: dict) -> None:
    """One table per part, as plain text."""
    for name, report in result["targets"].items():
        print(f"\n== {name} ({report['objective']}, step {report['step']})")
        if report["likelihood"]:
            lk = report["likelihood"]
            print(
                f"likelihood: {lk['nats_per_token']:.4f} +- {lk['standard_error']:.4f} "
                f"nats/token (PPL {lk['perplexity']:.2f}) over {lk['sequences']} sequences x "
                f"{lk['draws']} draws"
            )
        _table(
            ["steps", "top_p", "final_step", "gen_ppl", "entropy", "samples"], report["generation"]
        )
        _table(["steps", "batch", "tokens_per_s", "seconds", "forward_passes"], report["speed"])
        for task, values in report["tasks"].items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    if result["ar_baseline"]:
        print("\n== AR baseline (KV cache)")
        _table(
            ["steps", "batch", "tokens_per_s", "seconds", "forward_passes"], result["ar_baseline"]
        )
    if result.get("pareto"):
        print("\n== Pareto (gen-PPL vs tokens/s; * on the frontier)")
        _table(["target", "steps", "tokens_per_s", "gen_ppl", "on_frontier"], result["pareto"])


def _table(columns: list[str], rows: list[dict]) -> None:
    if not rows:
        return
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "*" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)
