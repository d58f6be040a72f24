"""Likelihood (docs/algorithms.md §8.1, §8.3): the validation bound of every sequence of a
dataset with several draws of t per sequence and its standard error, and the bound of a
continuation given a clean context (the zero-shot tasks' score).

The bound is the objective's validation loss (the ELBO; AR's exact NLL), estimated per
sequence as the mean over `draws` noised copies whose t are stratified over [eps, t_max):
draw k of K owns stratum k. The standard error is over sequences, so it holds both the noise
of the draws and the spread of the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.data_pipeline import open_dataset, validation_batches
from dlm_pretrain.pretrain.objectives.schedule import sample_t
from dlm_pretrain.pretrain.trained_model import TrainedModel, forward
from torch import Tensor

LIKELIHOOD_SEED_OFFSET = 2_000_003  # its noise differs from training's and validation's


@dataclass(frozen=True)
class Likelihood:
    nats_per_token: float  # the mean bound; an upper bound on the NLL except for AR (exact)
    standard_error: float
    sequences: int
    draws: int  # t draws per sequence

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)


@torch.no_grad()
def sequence_nats(
    model: TrainedModel,
    x0: Tensor,
    draws: int,
    first_id: int = 0,
    scored: Tensor | None = None,
) -> tuple[Tensor, int]:
    """The bound in nats of each sequence of x0 [N, L] (of its `scored` positions [N, L] bool
    given the others, kept clean), averaged over `draws` noisings keyed by the sequence's id
    first_id + i. -> ([N] float64, tokens scored per row when `scored` is None)"""
    objective = replace(model.objective, seed=model.objective.seed + LIKELIHOOD_SEED_OFFSET)
    n, device = len(x0), x0.device
    ids = first_id + torch.arange(n, device=device)
    t = torch.cat(
        [
            sample_t(
                objective.seed, int(i), torch.arange(draws, device=device), draws, objective.t_max
            )
            for i in ids.tolist()
        ]
    )
    rows = x0.repeat_interleave(draws, 0)
    clean = None if scored is None else ~scored.repeat_interleave(draws, 0)
    sample_ids = ids.repeat_interleave(draws) * draws + torch.arange(draws, device=device).repeat(n)
    inputs, labels = objective.batch(rows, t, sample_ids, model.vocab, clean)
    losses = objective.validation_loss(forward(model, inputs), *labels, model.vocab)
    owner = objective.label_rows(len(rows), device)
    per_row = losses.sum(1) if clean is None else objective.scored_sum(losses, ~clean[owner])
    totals = torch.zeros(n, dtype=torch.float64, device=device)
    totals.index_add_(0, owner // draws, per_row.double())
    return totals / draws, losses.shape[1]


def check_draws(model: TrainedModel, draws: int) -> None:
    """The draws of one sequence form its batch: Eso-LM's groups of rows must fit it."""
    if draws < 1:
        raise ConfigError(f"draws={draws}: take at least one draw of t per sequence")
    try:
        model.objective.check_micro_batch(draws)
    except ConfigError as e:
        raise ConfigError(
            f"{e}; here the draws of one sequence form its batch: take --draws in that multiple"
        ) from None


def dataset_likelihood(
    model: TrainedModel,
    data: str | Path | None = None,
    sequences: int = 256,
    draws: int = 1,
    batch_rows: int = 32,
) -> Likelihood:
    """The bound on the first `sequences` validation sequences of `data` (default: the
    dataset the run trained on), which must be tokenized as the run's were."""
    check_draws(model, draws)
    root = data or model.cfg.data.path
    manifest = open_dataset(root, seq_len=model.seq_len, tokenizer_sha256=model.tokenizer.sha256)
    per_batch = max(1, batch_rows // draws)
    estimates = []
    for batch in validation_batches(
        root, manifest, micro_batch_size=per_batch, dp_rank=0, dp_size=1, max_sequences=sequences
    ):
        first = int(batch.sample_ids[0])
        nats, tokens = sequence_nats(model, batch.tokens.to(model.runtime.device), draws, first)
        estimates.append(nats / tokens)
    per_sequence = torch.cat(estimates).cpu()
    n = len(per_sequence)
    spread = per_sequence.std().item() if n > 1 else float("nan")
    return Likelihood(per_sequence.mean().item(), spread / math.sqrt(n), n, draws)
