"""The backbone a run trains on a dataset: the model preset sized by the dataset's sequence
length and tokenizer, with the vocabulary padded for the tensor split. Training, sampling from
a run directory and the smoke check all build the same one."""

from __future__ import annotations

from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.data_pipeline.manifest import Manifest
from dlm_pretrain.parallel.config import ModelConfig
from dlm_pretrain.pretrain.config import RunConfig
from dlm_pretrain.pretrain.flops import steps_for_budget, training_flops_per_sequence
from dlm_pretrain.pretrain.objectives import build_objective
from dlm_pretrain.pretrain.objectives.vocab import Vocab

VOCAB_MULTIPLE = 128  # the vocabulary is padded to a multiple of 128 x tensor size


def model_spec(
    cfg: RunConfig, manifest: Manifest, padded_vocab: int | None = None
) -> tuple[ModelConfig, Vocab]:
    """The backbone for this dataset: L from the manifest, V padded to a multiple of
    128 x tensor size (fast matmuls, an even vocabulary split); padding ids and the tokenizer's
    pad are never noised, predicted or sampled. A run that continues a checkpoint passes its
    `padded_vocab`, so a new tensor size keeps the model it resumes."""
    special = manifest.tokenizer["special_ids"]
    tokenizer_size = manifest.tokenizer["vocab_size"]
    padded = padded_vocab or padded_vocab_size(tokenizer_size, cfg.parallel.tensor)
    if padded % cfg.parallel.tensor or padded < tokenizer_size:
        raise ConfigError(
            f"the checkpoint's vocabulary of {padded} rows cannot be split over "
            f"parallel.tensor={cfg.parallel.tensor}; choose a tensor size that divides {padded}"
        )
    padding = range(tokenizer_size, padded)
    vocab = Vocab.build(padded, special["mask"], never_in_data=(special["pad"], *padding))
    model = ModelConfig.preset(
        cfg.model.size,
        vocab_size=vocab.size,
        seq_len=manifest.seq_len,
        dropout=cfg.model.dropout,
        init_seed=cfg.model.init_seed,
    )
    return model, vocab


def padded_vocab_size(tokenizer_size: int, tensor: int) -> int:
    """V rounded up to a multiple of 128 x tensor size."""
    multiple = VOCAB_MULTIPLE * tensor
    return -(-tokenizer_size // multiple) * multiple


def flops_per_sequence(cfg: RunConfig, manifest: Manifest) -> int:
    """Training FLOPs of one sequence, counted on the tokenizer's vocabulary, not the padded
    one: a budget buys the same steps whatever the tensor size."""
    model = ModelConfig.preset(
        cfg.model.size, vocab_size=manifest.tokenizer["vocab_size"], seq_len=manifest.seq_len
    )
    objective = build_objective(cfg.objective)
    return training_flops_per_sequence(
        model,
        cfg.objective.name,
        manifest.seq_len,
        cfg.train.flops_convention,
        cfg.model.size,
        objective.sequential_share,
        objective.scored_share(manifest.seq_len),
    )


def total_steps(cfg: RunConfig, manifest: Manifest) -> int:
    """train.steps, or the steps train.flops_budget buys at the global batch."""
    if cfg.train.steps:
        return cfg.train.steps
    per_step = flops_per_sequence(cfg, manifest)
    steps = steps_for_budget(cfg.train.flops_budget, per_step, cfg.train.global_batch)
    if steps < 1:
        raise ConfigError(
            f"train.flops_budget={cfg.train.flops_budget:g} buys no step of "
            f"{per_step * cfg.train.global_batch:.3g} FLOPs; raise the budget or lower "
            "train.global_batch"
        )
    return steps
