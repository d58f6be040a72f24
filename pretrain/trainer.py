"""The training loop. The step reads top to bottom: batch, noise, forward/backward/step
(DeepSpeed), metrics, validation, checkpoint (docs/conventions.md §12)."""

from __future__ import annotations

import logging
import math
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from dlm_pretrain.common.errors import DlmError
from dlm_pretrain.data_pipeline import Tokenizer, TrainLoader, open_dataset, validation_batches
from dlm_pretrain.data_pipeline.manifest import MANIFEST_FILE, TOKENIZER_FILE, Manifest
from dlm_pretrain.parallel.config import ModelConfig
from dlm_pretrain.parallel.groups import ProcessGroups, Runtime, init_process_groups
from dlm_pretrain.parallel.head import HeadInput
from dlm_pretrain.parallel.model import build_pipeline
from dlm_pretrain.parallel.stages import forward_through_stages
from dlm_pretrain.pretrain import checkpoint
from dlm_pretrain.pretrain.config import (
    CONFIG_FILE,
    RunConfig,
    SamplingConfig,
    write_run_config,
)
from dlm_pretrain.pretrain.engine import apply_optim, build_engine, describe_schedule
from dlm_pretrain.pretrain.metrics import device_peak_flops, step_line, throughput
from dlm_pretrain.pretrain.model_spec import flops_per_sequence, model_spec, total_steps
from dlm_pretrain.pretrain.objectives import Objective, build_objective
from dlm_pretrain.pretrain.objectives.schedule import sample_t
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from dlm_pretrain.pretrain.revisions import (
    TOTAL_STEPS,
    Revision,
    RunHistory,
    first_start,
    restart,
    run_settings,
)
from dlm_pretrain.pretrain.run_records import SAMPLES, RunRecords, sample_path
from dlm_pretrain.pretrain.sampling import generate, start_id
from dlm_pretrain.pretrain.tracking import Tracker, default_tracking_uri, plot_losses

log = logging.getLogger(__name__)
VALIDATION_SEED_OFFSET = 1_000_003  # validation noise uses its own seed


class DivergenceError(DlmError):
    """Too many non-finite steps in a row."""


DROPOUT_SEED_STRIDE = 100  # dropout seed = init_seed + 100 x pipeline stage (megatron's offset)


def _train_loss(objective: Objective, vocab: Vocab, head: HeadInput, labels) -> torch.Tensor:
    """Token mean of the per-token loss over the micro-batch (docs/algorithms.md §4.0), on the
    last stage, from the head's input and this rank's vocabulary shard of the head."""
    x0, xt, t = labels
    return objective.train_loss(head, x0, xt, t, vocab)


def _noised_micro_batches(
    batches: Iterator,
    cfg: RunConfig,
    objective: Objective,
    vocab: Vocab,
    groups: ProcessGroups,
    first_step: int,
    device: torch.device,
) -> Iterator[tuple]:
    """(inputs, labels) per micro-batch on `device`, as Objective.batch builds them: DeepSpeed
    hands the inputs to the first stage and the labels to the last, each of which runs this
    generator over the same data and so draws the same noise without communicating. Row p of
    the global batch owns stratum p of t: data rank r, micro-step m holds rows
    r*G/dp + m*b + [0, b).

    The batch is the step's only host-to-device copy; t and the noise are drawn on the
    device (the Triton noising kernel on CUDA)."""
    g, b = cfg.train.global_batch, cfg.train.micro_batch
    accum = cfg.train.accumulation_steps(groups.dp_size)
    first_row = groups.dp_rank * (g // groups.dp_size)
    for k, batch in enumerate(batches):
        step, micro = first_step + k // accum, k % accum
        batch = batch.to(device)
        rows = torch.arange(first_row + micro * b, first_row + (micro + 1) * b, device=device)
        t = sample_t(objective.seed, step, rows, g, objective.t_max)
        yield objective.batch(batch.tokens, t, batch.sample_ids, vocab)


@torch.no_grad()
def validate(
    module,
    cfg: RunConfig,
    objective: Objective,
    model_cfg: ModelConfig,
    manifest: Manifest,
    vocab: Vocab,
    groups,
    device: torch.device,
) -> float:
    """The ELBO-based validation loss in nats/token (exact NLL for AR), summed in float64
    on the last stage over all data ranks. t of sequence i is stratum i mod G of validation
    batch i // G, so the figure does not depend on the layout."""
    objective = replace(objective, seed=objective.seed + VALIDATION_SEED_OFFSET)
    g = cfg.train.global_batch
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, tokens]
    module.eval()
    for batch in validation_batches(
        cfg.data.path,
        manifest,
        micro_batch_size=cfg.train.micro_batch,
        dp_rank=groups.dp_rank,
        dp_size=groups.dp_size,
        max_sequences=cfg.train.val_sequences or None,
    ):
        step = int(batch.sample_ids[0]) // g  # read on the host, before the copy
        batch = batch.to(device)
        ids = batch.sample_ids
        t = sample_t(objective.seed, step, ids % g, g, objective.t_max)
        inputs, labels = objective.batch(batch.tokens, t, ids, vocab)
        head = forward_through_stages(module, inputs, model_cfg, groups)
        if head is not None:  # the last stage
            losses = objective.validation_loss(head, *labels, vocab)
            total[0] += losses.double().sum()
            total[1] += losses.numel()
    module.train()
    dist.all_reduce(total, group=groups.dp_group)
    dist.all_reduce(total, group=groups.pp_group)  # only the last stage holds non-zeros
    return (total[0] / total[1]).item()  # host sync: once per validation


class _StopRequest:
    """SIGTERM / SIGUSR1 (SLURM preemption): finish the step, save, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was signalled (one scalar all-reduce per step, on
        the device: NCCL takes only GPU tensors)."""
        flag = torch.full((1,), float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())  # host sync


@dataclass(kw_only=True)
class _Run:
    """What the loop works with, built once by `_setup` (components, not logic)."""

    cfg: RunConfig
    runtime: Runtime
    groups: ProcessGroups
    manifest: Manifest
    model_cfg: ModelConfig
    vocab: Vocab
    objective: Objective
    engine: object  # deepspeed PipelineEngine
    loader: TrainLoader
    tracker: Tracker
    tokenizer: Tokenizer
    run_dir: Path
    layout: dict
    history: RunHistory
    records: RunRecords
    total_steps: int
    flops_per_seq: int
    peak_flops: float

    @property
    def is_logger(self) -> bool:
        return dist.get_rank() == 0


def run(cfg: RunConfig, runtime: Runtime | None = None) -> Path:
    """Train (or resume) the run in cfg.train.run_dir; returns the run directory. The device
    and compute dtype are `runtime`'s, by default Runtime.detect's (a GPU when there is one)."""
    r, state = _setup(cfg, runtime)
    micro_batches = _noised_micro_batches(
        iter(r.loader), cfg, r.objective, r.vocab, r.groups, state.step, r.runtime.device
    )
    stop, bad_in_a_row = _StopRequest(), 0
    clock = (time.perf_counter(), state.step)
    try:
        if state.step == 0:
            _validate_and_sample(r, state)  # the starting point of the validation curve
        while state.step < r.total_steps:
            loss = r.engine.train_batch(data_iter=micro_batches).item()  # host sync: one per step
            grad_norm = _grad_norm(r.engine)
            state.step += 1
            state.consumed_samples += cfg.train.global_batch
            state.flops += r.flops_per_seq * cfg.train.global_batch
            bad_in_a_row = _record_step(r, state, loss, grad_norm, bad_in_a_row)
            if state.step % cfg.train.log_every == 0 or state.step == r.total_steps:
                _log_step(r, state, loss, grad_norm, clock)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                _stop_diverged(r, state, bad_in_a_row)
            if state.step % cfg.train.val_every == 0 or state.step == r.total_steps:
                _validate_and_sample(r, state)
            if stop.agreed(r.runtime.device):
                _save(r, state)
                log.info("stop requested: saved at step %d, exiting", state.step)
                break
            if state.step % cfg.train.checkpoint_every == 0 or state.step == r.total_steps:
                _save(r, state)
    except BaseException:
        r.tracker.close("FAILED")  # else MLflow's active run outlives the run in this process
        raise
    finally:
        # Shut the loader's workers down now: left to interpreter exit, multiprocessing
        # would SIGTERM them, which they ignore (data_pipeline/reader.py), and wait forever.
        micro_batches.close()
    r.tracker.close()
    return r.run_dir


def _setup(cfg: RunConfig, runtime: Runtime | None = None) -> tuple[_Run, checkpoint.LoopState]:
    """Process groups, data, the run's settings against the checkpoint's, model, engine, the
    latest checkpoint if any; then the records and tracking, once nothing else can fail."""
    runtime = runtime or Runtime.detect(cfg.train.dtype or None)
    groups = init_process_groups(cfg.parallel, runtime)
    manifest = open_dataset(
        cfg.data.path, seq_len=cfg.data.seq_len, tokenizer_sha256=cfg.data.tokenizer_sha256
    )
    run_dir = Path(cfg.train.run_dir)
    checkpoint.clean_incomplete(run_dir)
    saved = checkpoint.saved_meta(run_dir)
    steps = total_steps(cfg, manifest)
    history, revision = _run_history(cfg, manifest, runtime, steps, saved)  # before any work
    imported = saved is not None and saved["format"] == checkpoint.WEIGHTS
    records = RunRecords(run_dir, None if saved is None or imported else saved["step"])
    model_cfg, vocab = model_spec(cfg, manifest, saved and saved["vocab_size"])
    vocab = vocab.to(runtime.device)
    objective = build_objective(cfg.objective)
    flops_per_seq = flops_per_sequence(cfg, manifest)
    cfg.train.accumulation_steps(groups.dp_size)  # checks the batch sizes before building

    layout = {"tensor": groups.tp_size, "pipeline": groups.pp_size, "data": groups.dp_size}
    universal = checkpoint.resume_source(run_dir, layout)

    # Dropout only (parameters and noise are keyed): the same stream on every tensor rank, as
    # dropout acts on activations replicated over the tensor group; its own on each stage.
    torch.manual_seed(cfg.model.init_seed + DROPOUT_SEED_STRIDE * groups.pp_rank)
    loss_fn = partial(_train_loss, objective, vocab)
    model = build_pipeline(
        model_cfg,
        groups,
        objective.attention_spec(),
        loss_fn=loss_fn,
        partition=cfg.parallel.partition,
        compute_dtype=runtime.dtype,
    )
    if imported:
        checkpoint.load_weights(model, checkpoint.checkpoint_folder(run_dir))
    engine = build_engine(
        model, cfg.train, cfg.optim, groups, history.schedule, universal is not None
    )
    loader = TrainLoader(
        cfg.data.path,
        manifest,
        micro_batch_size=cfg.train.micro_batch,
        dp_rank=groups.dp_rank,
        dp_size=groups.dp_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.data.seed,
        pin_memory=runtime.device.type == "cuda",
    )
    state = checkpoint.LoopState()
    if imported:
        log.info(
            "fine-tuning the imported weights in %s: the optimizer, learning-rate schedule and "
            "data position start fresh",
            run_dir,
        )
    elif (loaded := checkpoint.load(engine, run_dir, layout, universal)) is not None:
        state, client = loaded
        apply_optim(engine, cfg.optim)
        loader.load_state_dict(client["reader"])
        log.info("resumed from step %d (%s)", state.step, checkpoint.latest_tag(run_dir))
    _write_config(cfg, run_dir, history, revision, model_cfg, flops_per_seq)
    tracker = _open_records(cfg, history, records)
    r = _Run(
        cfg=cfg,
        runtime=runtime,
        groups=groups,
        manifest=manifest,
        model_cfg=model_cfg,
        vocab=vocab,
        objective=objective,
        engine=engine,
        loader=loader,
        tracker=tracker,
        tokenizer=Tokenizer.load(Path(cfg.data.path) / TOKENIZER_FILE),
        run_dir=run_dir,
        layout=layout,
        history=history,
        records=records,
        total_steps=steps,
        flops_per_seq=flops_per_seq,
        peak_flops=device_peak_flops(cfg.train.peak_flops),
    )
    if state.step:
        _plot_losses(r)  # without what the records held after the checkpoint
    if revision is not None:
        _log_revision(r, revision)
    return r, state


def _run_history(
    cfg: RunConfig, manifest: Manifest, runtime: Runtime, steps: int, saved: dict | None
) -> tuple[RunHistory, Revision | None]:
    """The run's settings (the config with what the dataset and device resolve), checked
    against the checkpoint's; the revisions so far, and this restart's (None: no change)."""
    resolved = {
        "data.seq_len": manifest.seq_len,
        "data.tokenizer_sha256": manifest.tokenizer_sha256,
        "train.dtype": str(runtime.dtype).removeprefix("torch."),
        TOTAL_STEPS: steps,
    }
    settings = run_settings(cfg.flat(), resolved)
    if saved is None or saved["format"] == checkpoint.WEIGHTS:
        return first_start(settings), None
    if "run" not in saved:
        log.warning(
            "the checkpoint at step %d predates recorded run settings: this restart is not "
            "checked, its settings are recorded as the run's first, and the learning-rate "
            "schedule is computed for the current number of steps from step 0",
            saved["step"],
        )
        return first_start(settings), None
    defaults = run_settings(RunConfig().flat(), {})
    saved_history = RunHistory.from_dict(saved["run"])
    return restart(saved_history, settings, saved["step"], cfg.train.allow_changes, defaults)


def _open_records(cfg: RunConfig, history: RunHistory, records: RunRecords) -> Tracker:
    """The run directory's records and MLflow run cut back to the checkpoint, with the
    settings and revisions recorded (rank 0; the tracker is a no-op elsewhere)."""
    run_dir = Path(cfg.train.run_dir)
    if dist.get_rank() == 0:
        records.rewind()
    tracker = Tracker(
        cfg.tracking.uri or default_tracking_uri(run_dir),
        cfg.tracking.experiment,
        run_dir,
        active=dist.get_rank() == 0,
        parent_run_id=cfg.tracking.parent_run_id,
        tags=cfg.tracking.tags,
        rewind=True,
        last_step=records.last_step,
    )
    tracker.log_params(history.settings)
    tracker.set_revisions([r.describe() for r in history.revisions])
    tracker.log_artifact(run_dir / CONFIG_FILE)
    return tracker


def _log_revision(r: _Run, revision: Revision) -> None:
    log.info("this restart changes the run's settings (config.yaml): %s", revision.describe())
    if TOTAL_STEPS in revision.changes:
        log.info(describe_schedule(r.history.schedule, r.cfg.optim, revision.step))


def _write_config(
    cfg: RunConfig,
    run_dir: Path,
    history: RunHistory,
    revision: Revision | None,
    model_cfg,
    flops_per_seq,
) -> None:
    """Print the resolved configuration and save it in the run directory, with every
    revision of the run, the dataset's manifest and tokenizer, so that the run directory
    alone can be exported (rank 0). train.allow_changes keeps the keys this start's revision
    used (a restart killed before its next checkpoint needs them again), nothing else."""
    allowed = tuple(revision.allowed) if revision else ()
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = write_run_config(run_dir, cfg, [asdict(r) for r in history.revisions], allowed)
        for name in (MANIFEST_FILE, TOKENIZER_FILE):
            shutil.copyfile(Path(cfg.data.path) / name, run_dir / name)
        log.info("configuration:\n%s", text)
        log.info(
            "%s: %d steps of %d sequences, %.3g training FLOPs per sequence",
            model_cfg,
            history.settings[TOTAL_STEPS],
            cfg.train.global_batch,
            flops_per_seq,
        )
    dist.barrier()


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)


def _record_step(r: _Run, state, loss: float, grad_norm: float, bad_in_a_row: int) -> int:
    """Append the step to train_log.jsonl; count non-finite steps (DeepSpeed skipped their
    update). Returns the new count in a row."""
    if r.is_logger:
        r.records.add_step(state.step, loss, grad_norm)
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return 0
    bad_in_a_row += 1
    state.skipped_steps += 1
    log.warning(
        "step %d: non-finite loss %s or grad norm %s, update skipped (%d in a row)",
        state.step,
        loss,
        grad_norm,
        bad_in_a_row,
    )
    return bad_in_a_row


def _stop_diverged(r: _Run, state, bad_in_a_row: int) -> None:
    """After max_bad_steps non-finite steps in a row: save (the step is logged) and stop."""
    _save(r, state)
    raise DivergenceError(
        f"{bad_in_a_row} non-finite steps in a row at step {state.step}; the last state is "
        f"saved in {r.run_dir}; restart it with a lower optim.lr "
        "(train.allow_changes=optim.lr) or check the data"
    )


def _log_step(r: _Run, state, loss: float, grad_norm: float, clock: tuple[float, int]) -> None:
    start, start_step = clock
    elapsed = time.perf_counter() - start
    speed = throughput(
        (state.step - start_step) * r.cfg.train.global_batch,
        elapsed,
        r.manifest.seq_len,
        r.flops_per_seq,
        dist.get_world_size(),
        r.peak_flops,
    )
    lr = r.engine.get_lr()[0]
    tokens_seen = state.consumed_samples * r.manifest.seq_len
    log.info(
        step_line(
            step=state.step,
            total=r.total_steps,
            tokens=tokens_seen,
            flops=state.flops,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=speed.tokens_per_s,
            flops_per_s_per_device=speed.flops_per_s_per_device,
            mfu=speed.mfu,
            elapsed_s=elapsed,
        )
    )
    r.tracker.log_metrics(
        {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": speed.tokens_per_s,
            "train/tokens": tokens_seen,
            "train/flops": state.flops,
            "train/skipped_steps": state.skipped_steps,
        },
        state.step,
    )


def _save(r: _Run, state) -> None:
    extra = {"reader": r.loader.state_dict(), "layout": r.layout, "config": r.cfg.to_dict()}
    meta = {
        "layout": r.layout,
        "layers": r.model_cfg.n_layers + 2,  # the input stage, the blocks, the output stage
        "vocab_size": r.model_cfg.vocab_size,
        "validation": r.records.last_validation(),  # rank 0's, which writes the meta
        "run": r.history.to_dict(),  # what a restart is checked against (pretrain/revisions.py)
    }
    tag = checkpoint.save(r.engine, r.run_dir, state, extra, meta)
    log.info("saved checkpoint %s", r.run_dir / "checkpoints" / tag)


def _validate_and_sample(r: _Run, state) -> None:
    val = validate(
        r.engine.module,
        r.cfg,
        r.objective,
        r.model_cfg,
        r.manifest,
        r.vocab,
        r.groups,
        r.runtime.device,
    )
    log.info("validation at step %d: loss %.4f, perplexity %.2f", state.step, val, math.exp(val))
    if r.is_logger:
        r.records.add_validation(state.step, val)
    r.tracker.log_metrics({"val/loss": val, "val/perplexity": math.exp(val)}, state.step)
    if r.groups.pp_size == 1:  # samplers need the whole model in one process
        _write_samples(r, state.step)
    _plot_losses(r)


def _plot_losses(r: _Run) -> None:
    """loss_curve.png from the records of the whole run (rank 0)."""
    if r.is_logger:
        r.tracker.log_artifact(plot_losses(r.records.curves(), r.run_dir / "loss_curve.png"))


def _write_samples(r: _Run, step: int) -> None:
    """Every rank samples (tensor ranks gather the logits together); rank 0 writes."""
    cfg = SamplingConfig(steps=r.cfg.train.sample_steps, num_samples=r.cfg.train.num_samples)
    samples = generate(
        r.objective,
        r.engine.module.forward_funcs,
        r.vocab,
        cfg,
        r.manifest.seq_len,
        start_id(r.tokenizer.special, cfg),
    )
    r.engine.module.train()
    if not r.is_logger:
        return
    text = "\n\n==========\n\n".join(r.tokenizer.decode(row.tolist()) for row in samples.tokens)
    path = sample_path(r.run_dir, step)
    path.write_text(text)
    r.tracker.log_artifact(path, SAMPLES)
