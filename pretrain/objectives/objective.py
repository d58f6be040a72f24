"""The one interface of every objective (docs/conventions.md §10).

An objective is a frozen dataclass whose fields are its options (the noise seed, MDLM's
loss_type); the trainer, validation, sampling, the smoke check and the FLOPs accounting use
only this interface, so adding an objective touches none of them. Shapes (docs/algorithms.md
§1): x0, xt [B, L] int64 token ids; t [B] f32 in [eps, 1); the losses take the last stage's
HeadInput (the head's input and this rank's vocabulary shard of the head, with its tensor
group) and compute logits only at the rows they read.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.parallel.config import AttentionSpec
from dlm_pretrain.parallel.head import HeadInput
from dlm_pretrain.pretrain.kernels.losses import Terms, mean_loss, row_losses
from dlm_pretrain.pretrain.objectives.draws import Samples
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor

if TYPE_CHECKING:  # pretrain.config imports this package
    from dlm_pretrain.pretrain.config import ObjectiveConfig, SamplingConfig


class Denoiser(Protocol):
    """The whole model as a sampler sees it (pretrain.sampling builds it from the layers)."""

    device: torch.device

    def logits(self, tokens: Tensor, s: Tensor, positions: Tensor | None = None) -> Tensor:
        """Full logits, gathered over the tensor group. tokens [N, L], s [N] -> [N, L, V] f32.
        With positions [N, L] int64 the tokens are sorted slots at those positions, attended
        causally (Eso-LM, docs/algorithms.md §9.3)."""

    def decoder(self) -> Callable[..., Tensor]:
        """An incremental causal decoder with its own key/value caches: each call
        (tokens, s, positions=None, keep=None) takes the next tokens [N, l] and s [N] and
        returns their full logits [N, l, V]. The tokens sit at positions [N, l] int64, or
        after the cached ones; they see every cached token and, causally, each other; only
        the first `keep` (all by default) are cached for later calls."""


@dataclass(frozen=True, kw_only=True)
class Objective(ABC):
    seed: int = 0  # of the corruption (t is drawn by schedule.sample_t with the same seed)

    causal: ClassVar[bool]  # the attention pattern of the backbone
    t_max: ClassVar[float] = 1.0  # training draws t from [eps, t_max) (schedule.sample_t)
    # the options under which per_token_loss is the validation bound (MDLM: loss_type="elbo")
    elbo_options: ClassVar[dict[str, str]] = {}
    # whether sampling.final_step chooses anything (AR and Eso-LM decode each token once)
    has_final_step: ClassVar[bool] = True
    # Elementwise FLOPs per token per vocabulary entry of the loss (an estimate for the FLOPs
    # accounting: max, subtract, exp, sum for the softmax, plus the objective's own sums).
    loss_flops_per_vocab_entry: ClassVar[int]

    @property
    def sequential_share(self) -> float:
        """The share of rows whose blocks run 2L tokens (Eso-LM's sequential branch), for the
        FLOPs accounting."""
        return 0.0

    def scored_share(self, seq_len: int) -> float:
        """The expected share of a sequence's positions the loss reads, where the head runs
        (the FLOPs accounting): every one by default."""
        return 1.0

    def refuse_final_step(self, cfg: SamplingConfig) -> None:
        """Families without a last step (has_final_step False: AR and Eso-LM decode each token
        once, by a draw from x̂) take an explicit sampling.final_step as an error rather than
        ignore it."""
        if not self.has_final_step and cfg.final_step != "default":
            raise ConfigError(
                f"sampling.final_step={cfg.final_step!r} does not apply to "
                f"{type(self).__name__}, which decodes every token once from x̂ and has no final "
                "step; leave sampling.final_step=default"
            )

    def check_micro_batch(self, micro_batch: int) -> None:
        """Raise ConfigError if train.micro_batch cannot hold what the objective puts in a
        micro-batch (Eso-LM's groups of rows); run at configuration time."""
        return None  # the other objectives fit any micro-batch

    def attention_spec(self) -> AttentionSpec:
        """The backbone's attention pattern for this objective (parallel.config)."""
        return AttentionSpec("causal" if self.causal else "bidirectional")

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig) -> Objective:
        """The objective of the config's `objective` section; options it has no use for are
        ignored."""
        return cls(seed=cfg.seed)

    @abstractmethod
    def noise(self, x0: Tensor, t: Tensor, sample_ids: Tensor, vocab: Vocab) -> Tensor:
        """xt, keyed by (seed, global sample index, position). x0 [B, L], t [B], sample_ids
        [B] -> [B, L] int64 on x0's device"""

    def batch(
        self, x0: Tensor, t: Tensor, sample_ids: Tensor, vocab: Vocab, clean: Tensor | None = None
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, Tensor, Tensor]]:
        """One micro-batch: the model's inputs (xt, s, and any positions the attention
        pattern takes) and the loss's labels (x0, xt, t). The trainer and validation build
        every batch here; evaluation passes `clean` [B, L] bool, the positions of a context
        that stays uncorrupted (the likelihood of a continuation given it)."""
        xt = keep_clean(self.noise(x0, t, sample_ids, vocab), x0, clean)
        return (xt, self.time_input(t)), (x0, xt, t)

    def label_rows(self, rows: int, device: torch.device) -> Tensor:
        """The batch row each row of the labels (and of the loss) scores, for a batch of
        `rows` rows. [label rows] int64"""
        return torch.arange(rows, device=device)

    @abstractmethod
    def time_input(self, t: Tensor) -> Tensor:
        """The scalar s the adaLN conditioning sees. [B] -> [B]"""

    @abstractmethod
    def head_terms(self, x0: Tensor, xt: Tensor, t: Tensor, vocab: Vocab) -> Terms:
        """The rows the loss reads (the head runs only there) and its per-row terms
        (pretrain.kernels.losses), rows indexing the per-token grid `loss_shape`."""

    def loss_shape(self, x0: Tensor) -> tuple[int, int]:
        """[B, L'] of the per-token losses: L' = L, or L - 1 where the last position predicts
        nothing."""
        return tuple(x0.shape)

    def per_token_loss(
        self, head: HeadInput, x0: Tensor, xt: Tensor, t: Tensor, vocab: Vocab
    ) -> Tensor:
        """The training loss per token, 0 where the loss reads nothing, without gradients
        (validation and evaluation). head: the last stage's HeadInput, this rank's
        vocabulary shard -> [B, L'] f32"""
        terms = self.head_terms(x0, xt, t, vocab)
        losses = torch.zeros(self.loss_shape(x0), device=x0.device)
        return losses.index_put_(terms.rows, row_losses(head, terms, vocab.real))

    def train_loss(
        self, head: HeadInput, x0: Tensor, xt: Tensor, t: Tensor, vocab: Vocab
    ) -> Tensor:
        """The token mean of per_token_loss, differentiable (docs/algorithms.md §4.0): the
        head's logits exist a block of rows at a time, with their gradient."""
        terms = self.head_terms(x0, xt, t, vocab)
        return mean_loss(head, terms, vocab.real, math.prod(self.loss_shape(x0)))

    def validation_loss(
        self, head: HeadInput, x0: Tensor, xt: Tensor, t: Tensor, vocab: Vocab
    ) -> Tensor:
        """The per-token bound whose mean is the validation figure (the ELBO; the exact NLL
        for AR): the training loss with `elbo_options`, whatever the run trains on
        (docs/pitfalls.md P18)."""
        bound = replace(self, **self.elbo_options)
        return bound.per_token_loss(head, x0, xt, t, vocab)

    def scored_sum(self, losses: Tensor, scored: Tensor) -> Tensor:
        """Per-row sum of the per-token `losses` [B', L'] over the `scored` positions [B', L]
        bool (natural order, the label rows'): a continuation's bound given its context.
        AR's position l scores token l + 1, hence the alignment on the right. -> [B'] f32"""
        return (losses * scored[:, scored.shape[1] - losses.shape[1] :]).sum(1)

    @abstractmethod
    def sample(
        self, model: Denoiser, vocab: Vocab, cfg: SamplingConfig, seq_len: int, start_id: int
    ) -> Samples:
        """cfg.num_samples sequences of seq_len tokens (docs/algorithms.md §9); start_id is the
        token AR starts after (pretrain.sampling.start_id), ignored by the others."""


def keep_clean(xt: Tensor, x0: Tensor, clean: Tensor | None) -> Tensor:
    """xt with the `clean` positions restored to x0 (all of xt when clean is None)."""
    return xt if clean is None else torch.where(clean, x0, xt)
