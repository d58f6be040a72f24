"""Samples from the latest checkpoint of a run directory (`dlm sample RUN_DIR`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dlm_pretrain.data_pipeline import Tokenizer, open_dataset
from dlm_pretrain.data_pipeline.manifest import TOKENIZER_FILE
from dlm_pretrain.parallel.config import ParallelConfig
from dlm_pretrain.parallel.groups import Runtime, init_process_groups
from dlm_pretrain.parallel.model import build_pipeline
from dlm_pretrain.pretrain import checkpoint
from dlm_pretrain.pretrain.config import SamplingConfig, load_config
from dlm_pretrain.pretrain.model_spec import model_spec
from dlm_pretrain.pretrain.objectives import build_objective
from dlm_pretrain.pretrain.sampling import generate, start_id


@dataclass(frozen=True)
class RunSamples:
    texts: list[str]
    step: int
    tokens_per_s: float
    forward_passes: int


def sample_run(run_dir: str | Path, sampling: SamplingConfig) -> RunSamples:
    run_dir = Path(run_dir)
    folder = checkpoint.checkpoint_folder(run_dir)
    cfg = load_config(str(run_dir / "config.yaml"), [])
    runtime = Runtime.detect()
    groups = init_process_groups(ParallelConfig(), runtime)  # one process, any saved layout
    manifest = open_dataset(cfg.data.path)
    model_cfg, vocab = model_spec(cfg, manifest, checkpoint.read_meta(folder)["vocab_size"])
    objective = build_objective(cfg.objective)
    model = build_pipeline(
        model_cfg, groups, objective.attention_spec(), compute_dtype=runtime.dtype
    )
    checkpoint.load_weights(model, folder)
    model.to(runtime.device)
    vocab = vocab.to(runtime.device)
    tokenizer = Tokenizer.load(Path(cfg.data.path) / TOKENIZER_FILE)
    start = time.perf_counter()
    samples = generate(
        objective,
        model.forward_funcs,
        vocab,
        sampling,
        manifest.seq_len,
        start_id(tokenizer.special, sampling),
    )
    seconds = time.perf_counter() - start
    step = checkpoint.read_meta(folder)["step"]
    return RunSamples(
        [tokenizer.decode(row.tolist()) for row in samples.tokens],
        step,
        samples.tokens.numel() / seconds,
        samples.forward_passes,
    )
