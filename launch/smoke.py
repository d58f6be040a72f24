"""The check to run first on a new machine or cluster, one command, a few minutes:

    python -m dlm_pretrain.launch.smoke [--out DIR] [--steps 30] [--size SIZE] [--data DIR] [k=v]
    torchrun --nproc-per-node N -m dlm_pretrain.launch.smoke ...   (several GPUs: every rank checks)

Devices and collectives, every Triton kernel against its PyTorch twin in float32 and bf16,
a short bf16 training run whose loss must fall, a sample, a resume from the checkpoint, then
tokens/s and MFU. One line per check; the exit code is 0 only if none failed. With several
ranks a check fails if it failed on any rank, rank 0 prints, and DIR must be shared by all
ranks (as a run directory is). Everything else printed goes to DIR/smoke.rankN.log.

This module holds the options, the report, the order of the checks and all but the kernel
comparisons, which are in launch.smoke_kernels; the result type `Check` and the helpers both
use (attempt, timed) are in launch.smoke_check, below both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.data_pipeline import open_dataset, prepare_dataset
from dlm_pretrain.launch.smoke_check import (
    FAIL,
    PASS,
    SKIP,
    STATUSES,
    Check,
    attempt,
    failed,
    timed,
)
from dlm_pretrain.launch.smoke_kernels import check_kernels
from dlm_pretrain.launch.train import DEFAULT_DATA, needs_default_data
from dlm_pretrain.parallel.config import ParallelConfig
from dlm_pretrain.parallel.groups import Runtime, init_process_groups
from dlm_pretrain.pretrain import checkpoint
from dlm_pretrain.pretrain.config import RunConfig, SamplingConfig, load_config
from dlm_pretrain.pretrain.metrics import device_peak_flops, throughput
from dlm_pretrain.pretrain.model_spec import flops_per_sequence
from dlm_pretrain.pretrain.run_sampling import sample_run
from dlm_pretrain.pretrain.trainer import run

log = logging.getLogger(__name__)
STEP_LINE = re.compile(r"step\s+(\d+)/\d+ \|")  # the start of pretrain.metrics.step_line


@dataclass(frozen=True)
class SmokeReport:
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(check.status != FAIL for check in self.checks)


@dataclass(frozen=True, kw_only=True)
class SmokeOptions:
    out: Path = Path("runs/smoke")  # the run directory is OUT/run, replaced at each check
    steps: int = 30
    size: str = ""  # model.size; default 19M on a GPU, cpu-small otherwise
    data: str = ""  # a prepared dataset; default the embedded corpus in data/stdlib
    overrides: tuple[str, ...] = ()  # section.key=value for the training run, applied last
    max_loss_ratio: float = 0.9  # mean loss of the last steps / of the first steps: below it

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise ConfigError(f"--steps {self.steps}: the loss check needs at least 2; use 30")


def run_smoke(opts: SmokeOptions, on_check: Callable[[Check], None] = print) -> SmokeReport:
    """Every check in order. A failure stops only the checks that need its result: without a
    runtime nothing runs; without a saved checkpoint no sample, resume or throughput."""
    checks: list[Check] = []

    def add(check: Check) -> None:
        log.info("this rank: %s", check.line())  # each rank's own figures, in its log
        checks.append(_agreed(check, runtime.device))
        on_check(checks[-1])

    try:
        runtime = Runtime.detect()
        init_process_groups(ParallelConfig(), runtime)
    except Exception as e:  # nothing else can run: reported
        on_check(check := failed("devices", e))
        return SmokeReport([check])
    add(check_devices(runtime))
    add(attempt("collectives", partial(check_collectives, runtime)))
    for check in check_kernels(runtime):
        add(check)
    clock, cfg = _StepClock(), None
    try:
        cfg = _training_config(opts)  # prepares the default dataset if needed
        add(attempt("training", partial(check_training, cfg, clock, opts.max_loss_ratio)))
    except Exception as e:  # an unusable dataset or override: reported
        add(failed("training", e))
    if cfg is None or checkpoint.latest_tag(cfg.train.run_dir) is None:
        for name in ("sample", "checkpoint reload", "throughput"):
            add(Check(name, SKIP, "no trained run"))
        return SmokeReport(checks)
    add(attempt("sample", partial(check_sample, cfg)))
    add(attempt("checkpoint reload", partial(check_resume, cfg)))
    add(attempt("throughput", partial(check_throughput, cfg, clock)))
    return SmokeReport(checks)


def _agreed(check: Check, device: torch.device) -> Check:
    """The worst status over all ranks: a GPU failing on rank 5 fails the check on rank 0."""
    worst = torch.tensor([STATUSES.index(check.status)], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MIN)
    status = STATUSES[int(worst)]
    return check if status == check.status else Check(check.name, status, "on another rank")


def check_devices(runtime: Runtime) -> Check:
    """What this process sees, and the runtime the trainer will use."""
    parts = [f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(runtime.device)
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        parts += [
            f"CUDA {torch.version.cuda}, NCCL {nccl}",
            f"{torch.cuda.device_count()} x {' + '.join(sorted(names))}",
            f"{free / 2**30:.1f}/{total / 2**30:.1f} GiB free",
        ]
    else:
        parts.append("no GPU")
    parts.append(f"this rank on {runtime.device}, {dist.get_world_size()} rank(s)")
    return Check("devices", PASS, ", ".join(parts))


def check_collectives(runtime: Runtime, size_bytes: int = 64 * 2**20) -> Check:
    """An all-reduce on the trainer's backend with its values checked; with several ranks also
    a send/recv ring and the bus bandwidth of a `size_bytes` all-reduce (as nccl-tests)."""
    world, rank, device = dist.get_world_size(), dist.get_rank(), runtime.device
    total = torch.full((1024,), rank + 1.0, device=device)
    dist.all_reduce(total)
    ok = bool((total == world * (world + 1) / 2).all())
    detail = f"{dist.get_backend()}: all_reduce over {world} rank(s) {'ok' if ok else 'WRONG'}"
    if world == 1:
        return Check("collectives", PASS if ok else FAIL, f"{detail}; send/recv needs 2+ ranks")
    received, sent = (
        torch.empty(1024, device=device),
        torch.full((1024,), rank + 0.0, device=device),
    )
    for request in dist.batch_isend_irecv(
        [
            dist.P2POp(dist.isend, sent, (rank + 1) % world),
            dist.P2POp(dist.irecv, received, (rank - 1) % world),
        ]
    ):
        request.wait()
    ring_ok = bool((received == (rank - 1) % world).all())
    _, ms = timed(partial(dist.all_reduce, torch.ones(size_bytes // 4, device=device)), device, 5)
    bus_gb_per_s = size_bytes / ms / 1e6 * 2 * (world - 1) / world
    detail += (
        f", send/recv ring {'ok' if ring_ok else 'WRONG'}, {size_bytes >> 20} MiB "
        f"all_reduce {bus_gb_per_s:.1f} GB/s bus bandwidth"
    )
    return Check("collectives", PASS if ok and ring_ok else FAIL, detail)


class _StepClock(logging.Handler):
    """When the trainer logs its step lines: between the first and the last only training
    steps run (validation, samples and the checkpoint come after the last one)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: list[tuple[int, float]] = []  # (step, time.time())

    def emit(self, record: logging.LogRecord) -> None:
        if match := STEP_LINE.match(record.getMessage()):
            self.marks.append((int(match[1]), record.created))


def _training_config(opts: SmokeOptions) -> RunConfig:
    """A small MDLM in bf16: one micro-batch per rank per step; validation and a checkpoint
    only at the end, so that the step lines time training alone; the user's overrides last."""
    gpu, steps = torch.cuda.is_available(), opts.steps
    micro = 32 if gpu else 8
    return load_config(
        "default",
        [
            f"data.path={_dataset(opts.data)}",
            f"train.run_dir={opts.out / 'run'}",
            f"model.size={opts.size or ('19M' if gpu else 'cpu-small')}",
            "train.dtype=bfloat16",
            f"train.steps={steps}",
            f"train.micro_batch={micro}",
            f"train.global_batch={micro * dist.get_world_size()}",
            f"train.val_sequences={micro}",
            f"train.log_every={max(1, steps // 3)}",
            f"train.val_every={steps}",
            f"train.checkpoint_every={steps}",
            "train.num_samples=1",
            "train.sample_steps=16",
            f"optim.min_warmup_steps={max(1, steps // 6)}",
            *opts.overrides,
        ],
    )


def _dataset(data: str) -> str:
    """--data, else the embedded corpus in data/stdlib, prepared once as `dlm train` does."""
    if data:
        return data
    if needs_default_data(DEFAULT_DATA.out):
        if dist.get_rank() == 0:
            prepare_dataset(DEFAULT_DATA)
        dist.barrier()
    return DEFAULT_DATA.out


def _train_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def check_training(cfg: RunConfig, clock: _StepClock, max_loss_ratio: float) -> Check:
    """A fresh run (the last smoke check's is removed, not resumed): PASS if the mean loss of
    the last steps is below max_loss_ratio x that of the first steps."""
    run_dir = Path(cfg.train.run_dir)
    if dist.get_rank() == 0 and run_dir.exists():
        shutil.rmtree(run_dir)
    dist.barrier()
    trainer_log = logging.getLogger("dlm_pretrain.pretrain.trainer")
    level = trainer_log.level
    trainer_log.setLevel(logging.INFO)  # the step lines, whatever the caller's logging
    trainer_log.addHandler(clock)
    try:
        run(cfg)
    finally:
        trainer_log.removeHandler(clock)
        trainer_log.setLevel(level)
    losses = [record["loss"] for record in _train_log(run_dir)]
    n = max(1, min(5, len(losses) // 2))
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    ok = len(losses) == cfg.train.steps and math.isfinite(last) and last < max_loss_ratio * first
    detail = f"{len(losses)} steps, {cfg.model.size} {cfg.train.dtype}: mean loss of first/last {n}"
    detail += f" {first:.3f} -> {last:.3f} (must be < {max_loss_ratio} x)"
    return Check("training", PASS if ok else FAIL, detail)


def check_sample(cfg: RunConfig) -> Check:
    """A sample from the saved checkpoint, as `dlm sample` writes it."""
    samples = sample_run(cfg.train.run_dir, SamplingConfig(steps=16, num_samples=1))
    text = samples.texts[0] if samples.texts else ""
    detail = f"step {samples.step}, {samples.tokens_per_s:.0f} tok/s: {text[:40]!r}"
    return Check("sample", PASS if text.strip() else FAIL, detail)


def check_resume(cfg: RunConfig) -> Check:
    """Two more steps in the same run directory: PASS if the run went on from the checkpoint
    (steps N+1 and N+2 appended, not a restart from step 1) and saved step N+2."""
    run_dir, steps = Path(cfg.train.run_dir), cfg.train.steps
    before = len(_train_log(run_dir))
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps + 2})})
    run(longer)
    new_steps = [record["step"] for record in _train_log(run_dir)[before:]]
    latest = checkpoint.latest_tag(run_dir)
    ok = new_steps == [steps + 1, steps + 2] and latest == f"step{steps + 2:08d}"
    detail = f"resumed at step {steps}, ran steps {new_steps}, latest checkpoint {latest}"
    return Check("checkpoint reload", PASS if ok else FAIL, detail)


def check_throughput(cfg: RunConfig, clock: _StepClock) -> Check:
    """Tokens/s of the first run between its first and last step lines, and the model FLOPs
    utilisation against pretrain.metrics.device_peak_flops (train.peak_flops when set)."""
    if len(clock.marks) < 2:
        return Check("throughput", FAIL, "fewer than 2 step lines in the trainer's log")
    (first_step, start), (last_step, end) = clock.marks[0], clock.marks[-1]
    manifest = open_dataset(cfg.data.path)
    speed = throughput(
        (last_step - first_step) * cfg.train.global_batch,
        end - start,
        manifest.seq_len,
        flops_per_sequence(cfg, manifest),
        dist.get_world_size(),
        device_peak_flops(cfg.train.peak_flops),
    )
    detail = (
        f"{speed.tokens_per_s:,.0f} tok/s over steps {first_step}-{last_step}, "
        f"{speed.flops_per_s_per_device / 1e12:.3f} TFLOP/s per device, "
        f"MFU {100 * speed.mfu:.1f}%"
    )
    return Check("throughput", PASS, detail)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dlm_pretrain.launch.smoke",
        description="Devices, collectives, Triton kernels, training, sample, resume, MFU.",
    )
    parser.add_argument("--out", default="runs/smoke", help="run directory and log (OUT/run)")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--size", default="", help="model.size (default: 19M on GPU, cpu-small)")
    parser.add_argument("--data", default="", help="a prepared dataset (default: data/stdlib)")
    parser.add_argument(
        "--max-loss-ratio",
        type=float,
        default=0.9,
        help="last/first mean training loss must be below it",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="for the training run, e.g. optim.lr=3e-3",
    )
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        opts = SmokeOptions(
            out=Path(args.out),
            steps=args.steps,
            size=args.size,
            data=args.data,
            overrides=tuple(args.overrides),
            max_loss_ratio=args.max_loss_ratio,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts.out.mkdir(parents=True, exist_ok=True)
    terminal, start = sys.stdout, time.perf_counter()
    log_path = opts.out / f"smoke.rank{os.environ.get('RANK', '0')}.log"

    def show(check: Check) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(check.line(), file=terminal, flush=True)

    handler, root = logging.FileHandler(log_path, mode="w"), logging.getLogger()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    terminal_handlers = root.handlers[:]  # `dlm smoke` logs to the terminal: the file instead
    for h in terminal_handlers:
        root.removeHandler(h)
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:  # the libraries' own prints go to the log, the check lines to the terminal
        with contextlib.redirect_stdout(handler.stream):
            report = run_smoke(opts, show)
    finally:
        root.removeHandler(handler)
        for h in terminal_handlers:
            root.addHandler(h)
        root.setLevel(level)
        handler.close()
    counts = ", ".join(f"{sum(c.status == s for c in report.checks)} {s}" for s in STATUSES)
    show(
        Check(
            "smoke check",
            PASS if report.passed else FAIL,
            f"{counts} in {time.perf_counter() - start:.0f} s; log in {log_path}",
        )
    )
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
