"""A run's checkpoint as one process's model: what sampling and evaluation work on.

Everything comes from the run directory itself (its config, manifest and tokenizer), not
from the dataset it was trained on, so a run copied to another machine, or one imported
from a Hugging Face export, loads without its data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from dlm_pretrain.data_pipeline import Tokenizer
from dlm_pretrain.data_pipeline.manifest import TOKENIZER_FILE, Manifest, load_manifest
from dlm_pretrain.parallel.config import ModelConfig, ParallelConfig
from dlm_pretrain.parallel.groups import Runtime, init_process_groups
from dlm_pretrain.parallel.head import HeadInput
from dlm_pretrain.parallel.model import build_pipeline
from dlm_pretrain.pretrain import checkpoint
from dlm_pretrain.pretrain.config import CONFIG_FILE, RunConfig, SamplingConfig, load_config
from dlm_pretrain.pretrain.model_spec import model_spec
from dlm_pretrain.pretrain.objectives import Objective, build_objective
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from dlm_pretrain.pretrain.sampling import Sampler, start_id
from torch import nn


@dataclass(frozen=True)
class TrainedModel:
    run_dir: Path
    cfg: RunConfig
    step: int
    objective: Objective
    model_cfg: ModelConfig
    module: nn.Module  # the PipelineModule, pipeline size 1, in eval mode
    vocab: Vocab  # on the model's device
    tokenizer: Tokenizer
    manifest: Manifest
    runtime: Runtime

    @property
    def layers(self) -> Sequence[nn.Module]:
        return self.module.forward_funcs

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def name(self) -> str:
        return self.run_dir.name


def load_trained_model(
    run_dir: str | Path, step: int | None = None, runtime: Runtime | None = None
) -> TrainedModel:
    """The latest checkpoint of `run_dir` (or `step`'s) in this process, whatever tensor and
    pipeline sizes saved it."""
    run_dir = Path(run_dir)
    folder = checkpoint.checkpoint_folder(run_dir, step)
    meta = checkpoint.read_meta(folder)
    cfg = load_config(str(run_dir / CONFIG_FILE), [])
    runtime = runtime or Runtime.detect()
    groups = init_process_groups(ParallelConfig(), runtime)
    manifest = load_manifest(run_dir)
    model_cfg, vocab = model_spec(cfg, manifest, meta["vocab_size"])
    objective = build_objective(cfg.objective)
    module = build_pipeline(
        model_cfg, groups, objective.attention_spec(), compute_dtype=runtime.dtype
    )
    checkpoint.load_weights(module, folder)
    module.to(runtime.device).eval()
    return TrainedModel(
        run_dir=run_dir,
        cfg=cfg,
        step=meta["step"],
        objective=objective,
        model_cfg=model_cfg,
        module=module,
        vocab=vocab.to(runtime.device),
        tokenizer=Tokenizer.load(run_dir / TOKENIZER_FILE),
        manifest=manifest,
        runtime=runtime,
    )


@torch.no_grad()
def forward(model: TrainedModel, inputs: tuple[torch.Tensor, ...]) -> HeadInput:
    """The head's input for a batch that Objective.batch built (one process: the whole
    vocabulary; `.logits()` gives [B', L, V])."""
    out = inputs
    for layer in model.layers:
        out = layer(out)
    return out


def untrained_like(model: TrainedModel, objective: Objective) -> TrainedModel:
    """The same backbone with freshly initialised weights for another objective: a speed
    baseline (timing does not depend on the weights)."""
    groups = init_process_groups(ParallelConfig(), model.runtime)
    module = build_pipeline(
        model.model_cfg, groups, objective.attention_spec(), compute_dtype=model.runtime.dtype
    )
    module.to(model.runtime.device).eval()
    return replace(model, objective=objective, module=module)


def sampler_of(model: TrainedModel, cfg: SamplingConfig) -> Sampler:
    """The model's sampler, AR starting after the token `cfg` asks for."""
    first = start_id(model.tokenizer.special, cfg)
    return Sampler(
        model.objective, model.layers, model.vocab, model.seq_len, first, model.runtime.device
    )
