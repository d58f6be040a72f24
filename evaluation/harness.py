"""Zero-shot tasks through lm-evaluation-harness (docs/algorithms.md §8.3): our models as the
lm-eval model "dlm", registered when this module is imported.

A request's score is the bound of its continuation given its context, kept clean
(likelihood.sequence_nats): AR's exact log-likelihood, the diffusion families' Monte Carlo
ELBO over `draws` stratified draws of t. Every row starts with EOS, the token before a
document in the packed training data, so an empty context works and AR scores the first
continuation token.

Run it as lm-eval's own command line with the model registered first:
    python -m dlm_pretrain.evaluation.harness --model dlm --model_args pretrained=RUN,draws=32 \
        --tasks arc_easy
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.evaluation.likelihood import check_draws, sequence_nats
from dlm_pretrain.evaluation.target import load_target
from dlm_pretrain.pretrain.objectives import AR
from dlm_pretrain.pretrain.trained_model import TrainedModel, forward
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    tokens: list[int]  # EOS, then context, then continuation; at most seq_len tokens
    scored: int  # the last `scored` tokens: the continuation


@register_model("dlm")
class DlmLM(LM):
    """A run directory or `dlm export-hf` folder as an lm-eval model. lm-eval passes
    `model_args` (pretrained=PATH,draws=N) and its own batch_size and device (its command line
    always sends device=cuda:0; the model's device is the one dlm detects)."""

    def __init__(
        self,
        pretrained: str | Path,
        draws: int = 32,
        batch_size: int | str = 32,
        device: str | None = None,
    ) -> None:
        super().__init__()
        self.model = load_target(pretrained)
        self.exact = isinstance(self.model.objective, AR)
        self.draws = 1 if self.exact else int(draws)  # AR has no noise to average over
        check_draws(self.model, self.draws)
        self.rows_per_forward = _rows_per_forward(batch_size)
        if device is not None and torch.device(device) != self.model.runtime.device:
            log.info(
                "lm-eval's device=%s is not used: dlm places the model itself, here on %s "
                "(CUDA_VISIBLE_DEVICES and LOCAL_RANK pick the GPU)",
                device,
                self.model.runtime.device,
            )

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log-likelihood bound, is_greedy) of each (context, continuation). is_greedy is
        exact for AR (the argmax at every continuation position is its token); the diffusion
        families return False: no single greedy decode of a denoiser defines it."""
        rows = [self._row(*request.args) for request in requests]
        return [(-nats, greedy) for nats, greedy in self._score(rows)]

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        """The bound of each whole text: windows of seq_len - 1 tokens, each after an EOS,
        scored independently and summed."""
        windows = [self._windows(request.args[0]) for request in requests]
        scores = iter(self._score([row for rows in windows for row in rows]))
        return [-sum(nats for nats, _ in itertools.islice(scores, len(w))) for w in windows]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "the dlm model scores likelihoods only: generation tasks need a sampler that "
            "conditions on a prompt, which ours do not; choose multiple-choice or perplexity tasks"
        )

    def _row(self, context: str, continuation: str) -> Row:
        """Tokenized as lm-eval's HFLM does: trailing spaces of the context move to the
        continuation (our pieces carry the space before a word), the two parts encoded
        separately; truncated on the left to seq_len."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx, cont = (ids.tolist() for ids in self.model.tokenizer.encode([context, continuation]))
        if len(cont) >= self.model.seq_len:
            raise ConfigError(
                f"a continuation of {len(cont)} tokens does not fit a row of seq_len="
                f"{self.model.seq_len} after its EOS; this task needs a model with longer rows"
            )
        tokens = [self.model.tokenizer.special.eos, *ctx, *cont]
        return Row(tokens[-self.model.seq_len :], len(cont))

    def _windows(self, text: str) -> list[Row]:
        eos, width = self.model.tokenizer.special.eos, self.model.seq_len - 1
        ids = self.model.tokenizer.encode([text])[0].tolist()
        chunks = (ids[i : i + width] for i in range(0, len(ids), width))
        return [Row([eos, *chunk], len(chunk)) for chunk in chunks]

    def _score(self, rows: list[Row]) -> list[tuple[float, bool]]:
        """(nats, is_greedy) of every row, batched by equal length. The noise of a row is
        keyed by its place in the length-sorted order, so a rerun gives identical numbers."""
        scores: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        per_forward = max(1, self.rows_per_forward // self.draws)
        first_id, device = 0, self.model.runtime.device
        for batch in _equal_length_batches([len(r.tokens) for r in rows], per_forward):
            x0 = torch.tensor([rows[i].tokens for i in batch], device=device)
            counts = torch.tensor([rows[i].scored for i in batch], device=device)
            scored = torch.arange(x0.shape[1], device=device) >= x0.shape[1] - counts[:, None]
            nats, _ = sequence_nats(self.model, x0, self.draws, first_id, scored)
            greedy = _ar_greedy(self.model, x0, scored) if self.exact else [False] * len(batch)
            for i, n, g in zip(batch, nats.tolist(), greedy, strict=True):  # host sync
                scores[i] = (n, g)
            first_id += len(batch)
        return scores


def _rows_per_forward(batch_size: int | str) -> int:
    """lm-eval's batch_size, read as rows per forward (a request takes `draws` rows, and a
    forward holds at least one request)."""
    try:
        rows = int(batch_size)
    except ValueError:
        rows = 0
    if rows < 1:
        raise ConfigError(
            f"batch_size={batch_size}: pass a positive number of rows per forward "
            "(automatic batch sizes are not supported)"
        )
    return rows


def _equal_length_batches(lengths: list[int], size: int) -> Iterator[list[int]]:
    """Indices of `lengths` in length order, in runs of equal length of at most `size`."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for _, same in itertools.groupby(order, key=lengths.__getitem__):
        run = list(same)
        yield from (run[i : i + size] for i in range(0, len(run), size))


def _ar_greedy(model: TrainedModel, x0: Tensor, scored: Tensor) -> list[bool]:
    """Whether greedy decoding reproduces each row's scored tokens: position l - 1's argmax
    over the real ids is token l at every scored l. x0, scored [N, L] -> N bools"""
    ids = torch.arange(len(x0), device=x0.device)
    inputs, _ = model.objective.batch(x0, torch.zeros(len(x0), device=x0.device), ids, model.vocab)
    logits = forward(model, inputs).logits()[:, :-1]  # [N, L-1, V]: position l - 1 predicts token l
    targets = scored[:, 1:]
    best = logits[targets].masked_fill(~model.vocab.real, float("-inf")).argmax(-1)
    hit = torch.ones_like(targets)
    hit[targets] = best == x0[:, 1:][targets]
    return hit.all(1).tolist()  # host sync


def run_tasks(
    target: str | Path,
    tasks: list[str],
    include_path: str | None = None,
    draws: int = 32,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """lm-eval's tasks (and those of the task YAMLs under include_path) on the model at
    `target`, at most `limit` documents each. -> task -> metric -> value (the metric named
    as lm-eval names it, without its default filter: "acc", "acc_stderr")"""
    results = simple_evaluate(
        model=DlmLM(target, draws=draws),
        tasks=tasks,
        task_manager=TaskManager(include_path=include_path),
        limit=limit,
        log_samples=False,
    )
    return {task: _metrics(values) for task, values in results["results"].items()}


def _metrics(values: dict) -> dict[str, float]:
    """lm-eval's "acc,none": 0.5 entries as "acc": 0.5; labels and "N/A" left out."""
    return {
        key.removesuffix(",none"): float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
