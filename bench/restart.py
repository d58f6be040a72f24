"""What a restart costs in records: cutting the step and validation logs back to the
checkpoint, and replacing an MLflow run that holds steps after it (pretrain/run_records.py,
pretrain/tracking.py).

    python bench/restart.py [--steps 100000] [--log-every 10] [--val-every 1000]

Writes a run that went `--steps` steps (a train_log.jsonl line per step, the trainer's seven
train metrics every `--log-every` steps and two validation metrics every `--val-every` into
a sqlite MLflow store), then times, for a checkpoint at the end (a clean preemption stop)
and 500 steps before it (a kill):
- reading and cutting the records, as every rank does before any work and rank 0 writes;
- the tracker's start: the copy of what survives when the MLflow run holds later steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from dlm_pretrain.pretrain.run_records import TRAIN_LOG, VAL_LOG, RunRecords
from dlm_pretrain.pretrain.tracking import Tracker

TRAIN_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "tokens", "flops", "skipped_steps")


def write_run(run_dir: Path, uri: str, steps: int, log_every: int, val_every: int) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    run_dir.mkdir(parents=True)
    lines = [{"step": s, "loss": 3.0 / s, "grad_norm": 0.5} for s in range(1, steps + 1)]
    (run_dir / TRAIN_LOG).write_text("".join(json.dumps(r) + "\n" for r in lines))
    validations = [{"step": s, "loss": 3.0 / (s + 1)} for s in range(0, steps + 1, val_every)]
    (run_dir / VAL_LOG).write_text("".join(json.dumps(r) + "\n" for r in validations))
    tracker = Tracker(uri, "bench", run_dir, active=True, rewind=True)
    tracker.close()
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"train/{key}", 1.0 / s, now + s, s)
        for s in range(log_every, steps + 1, log_every)
        for key in TRAIN_METRICS
    ]
    metrics += [
        Metric(f"val/{key}", 1.0 / (s + 1), now + s, s)
        for s in range(0, steps + 1, val_every)
        for key in ("loss", "perplexity")
    ]
    client = MlflowClient(uri)
    for i in range(0, len(metrics), 1000):
        client.log_batch(tracker.run_id, metrics=metrics[i : i + 1000])
    print(f"a run of {steps} steps: {len(metrics)} MLflow metric values, {steps} log lines")


def time_restart(run_dir: Path, uri: str, last_step: int) -> tuple[float, float]:
    start = time.perf_counter()
    RunRecords(run_dir, last_step).rewind()
    records = time.perf_counter() - start
    start = time.perf_counter()
    tracker = Tracker(uri, "bench", run_dir, active=True, rewind=True, last_step=last_step)
    tracker.close()
    return records, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--val-every", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        original, uri = Path(tmp) / "original", f"sqlite:///{tmp}/mlflow.db"
        write_run(original / "run", uri, args.steps, args.log_every, args.val_every)
        print("| checkpoint | records (s) | MLflow start (s) |\n| --- | --- | --- |")
        # the end first: the other replaces (and deletes) the MLflow run both copies name
        for name, last_step in (("the end", args.steps), ("500 steps before", args.steps - 500)):
            copy = Path(tmp) / name.replace(" ", "-")
            shutil.copytree(original, copy)
            records, tracking = time_restart(copy / "run", uri, last_step)
            print(f"| {name} | {records:.2f} | {tracking:.2f} |")


if __name__ == "__main__":
    main()
