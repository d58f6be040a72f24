"""Eso-LM, the interpolation between AR and masked diffusion (docs/algorithms.md §3.3, §4.4,
§5.6, §9.3).

A denoiser that is causal over a per-sequence order of the tokens: every sequence is sorted so
that its clean tokens come first (in a random order), then its masked ones; each slot keeps
the rotary angle of its original position and sees the slots before it. Two branches share
the model, over disjoint rows of every micro-batch (`batch_split` of them diffusion rows):
- diffusion: masked diffusion with the schedule alpha_0 alpha_t, MDLM's loss on the sorted
  tokens (a sum over tokens: sorting changes no figure);
- sequential: each token masked with probability 1 - alpha_0, the masks sorted left to right
  and each scored given the clean tokens and the true tokens of the masks before it: the
  model sees 2L tokens [z_0 ; x], the z-half's masks attending to the x-half's earlier slots.
Each branch is token-averaged over its own rows and the two are added: a Monte-Carlo estimate
of the Eso-LM NELBO. alpha_0 = 1 (the paper's setting) is the diffusion branch alone, alpha_0
= 0 the sequential one (AR, left to right). The sampler decodes slots front to back, keeping
the keys and values of decoded tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, ClassVar

import torch
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.parallel.config import AttentionSpec
from dlm_pretrain.pretrain.objectives.corruption import corrupt
from dlm_pretrain.pretrain.objectives.draws import (
    T_MIN,
    Samples,
    categorical,
    denoiser,
)
from dlm_pretrain.pretrain.objectives.mdlm import MDLM
from dlm_pretrain.pretrain.objectives.objective import Denoiser, keep_clean
from dlm_pretrain.pretrain.objectives.randomness import STREAM_ORDER, philox4x32, row_keys
from dlm_pretrain.pretrain.objectives.schedule import EPS, alpha
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor

if TYPE_CHECKING:  # pretrain.config imports this package
    from dlm_pretrain.pretrain.config import ObjectiveConfig, SamplingConfig

MAX_SPLIT_DENOMINATOR = 64  # batch_split is read as a fraction n/d with d <= 64


@dataclass(frozen=True, kw_only=True)
class EsoLM(MDLM):
    alpha_0: float = 1.0  # clean share where diffusion ends; 1 - alpha_0 is decoded in order
    batch_split: float = 1.0  # share of the rows in the diffusion branch

    causal: ClassVar[bool] = True  # over the sorted slots (the FLOPs count half the scores)
    has_final_step: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        one_branch = self.alpha_0 in (0, 1) or self.split in (0, 1)
        if one_branch and self.alpha_0 != self.split:
            raise ConfigError(
                f"objective.alpha_0={self.alpha_0} with objective.batch_split="
                f"{self.batch_split}: alpha_0 = 1 trains only the diffusion branch and 0 only "
                "the sequential one, so batch_split must equal it there (and lie strictly "
                f"between 0 and 1 otherwise, at least 1/{MAX_SPLIT_DENOMINATOR} from either)"
            )

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig) -> EsoLM:
        return cls(
            seed=cfg.seed,
            loss_type=cfg.loss_type,
            alpha_0=cfg.alpha_0,
            batch_split=cfg.batch_split,
        )

    @property
    def split(self) -> Fraction:
        """batch_split as n/d: in every d consecutive rows of the global batch, the first n
        are diffusion rows (so d must divide the micro-batch)."""
        return Fraction(self.batch_split).limit_denominator(MAX_SPLIT_DENOMINATOR)

    @property
    def sequential_share(self) -> float:
        return 1 - float(self.split)

    def scored_share(self, seq_len: int) -> float:
        """The masks: 1 - alpha_0 E[alpha_t] on diffusion rows, 1 - alpha_0 on sequential ones."""
        split = float(self.split)
        diffusion = 1 - self.alpha_0 * (1 - super().scored_share(seq_len))
        return split * diffusion + (1 - split) * (1 - self.alpha_0)

    def check_micro_batch(self, micro_batch: int) -> None:
        n, d = self.split.numerator, self.split.denominator
        if micro_batch % d:
            raise ConfigError(
                f"objective.batch_split={self.batch_split} puts {n} of every {d} rows in the "
                f"diffusion branch, which train.micro_batch={micro_batch} cannot hold; use a "
                f"micro_batch that is a multiple of {d}"
            )

    def attention_spec(self) -> AttentionSpec:
        return AttentionSpec(
            "sorted", diffusion_rows=self.alpha_0 > 0, sequential_rows=self.alpha_0 < 1
        )

    def noise(self, x0: Tensor, t: Tensor, sample_ids: Tensor, vocab: Vocab) -> Tensor:
        """The diffusion branch's: mask with probability 1 - alpha_0 alpha_t (MDLM's bits at
        alpha_0 = 1)."""
        p = 1 - self.alpha_0 * alpha(t)
        return corrupt(x0, sample_ids, self.seed, vocab, corrupt_p=p, mask_p=p)

    def batch(
        self, x0: Tensor, t: Tensor, sample_ids: Tensor, vocab: Vocab, clean: Tensor | None = None
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, Tensor, Tensor]]:
        """Inputs (tokens [b_d + 2 b_s, L] = [diffusion | z-halves | x-halves], s, and the
        positions [b_d, L], [b_s, L] of the row kinds the run has) and labels (x0, xt, t)
        of the b_d + b_s scored rows in sorted order, t = 0 marking sequential rows. Row i of
        the micro-batch is a diffusion row iff i mod d < n (micro-batches start at multiples
        of d, so this is the global row's kind: the same on any layout). A short last
        validation chunk leaves out its incomplete group of d rows, so that every figure
        holds both branches in their proportion. `clean` positions are never masked."""
        usable = len(x0) - len(x0) % self.split.denominator  # see the docstring
        x0, t, sample_ids = x0[:usable], t[:usable], sample_ids[:usable]
        diffusion, sequential = self._row_kinds(usable, x0.device)
        clean_d = clean_s = None
        if clean is not None:
            clean_d, clean_s = clean[:usable][diffusion], clean[:usable][sequential]
        x0_d, x0_s = x0[diffusion], x0[sequential]
        zt = keep_clean(self.noise(x0_d, t[diffusion], sample_ids[diffusion], vocab), x0_d, clean_d)
        p = torch.full_like(t[sequential], 1 - self.alpha_0)
        z0 = corrupt(x0_s, sample_ids[sequential], self.seed, vocab, corrupt_p=p, mask_p=p)
        z0 = keep_clean(z0, x0_s, clean_s)
        pos_d = self.order(zt, sample_ids[diffusion], vocab)
        pos_s = self.order(z0, sample_ids[sequential], vocab, masks_in_order=True)
        zt, z0 = zt.gather(1, pos_d), z0.gather(1, pos_s)
        x0_d, x0_s = x0_d.gather(1, pos_d), x0_s.gather(1, pos_s)
        tokens = torch.cat([zt, z0, x0_s])
        positions = [p for p, kept in zip((pos_d, pos_s), self._kinds(), strict=True) if kept]
        s = torch.zeros(len(tokens), device=x0.device)
        t = torch.cat([t[diffusion], torch.zeros_like(p)])
        labels = (torch.cat([x0_d, x0_s]), torch.cat([zt, z0]), t)
        return (tokens, s, *positions), labels

    def label_rows(self, rows: int, device: torch.device) -> Tensor:
        """The diffusion rows, then the sequential ones (as `batch` orders the labels)."""
        usable = rows - rows % self.split.denominator
        return torch.cat(self._row_kinds(usable, device))

    def scored_sum(self, losses: Tensor, scored: Tensor) -> Tensor:
        """The whole row: the labels are in sorted order, and the tokens outside the scored
        continuation are clean, which score 0 (carry-over)."""
        return losses.sum(1)

    def _kinds(self) -> tuple[bool, bool]:
        spec = self.attention_spec()
        return spec.diffusion_rows, spec.sequential_rows

    def _row_kinds(self, rows: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Indices of the diffusion and the sequential rows of a micro-batch of a multiple of
        d rows, built on the device from its size alone."""
        n, d = self.split.numerator, self.split.denominator
        index = torch.arange(rows, device=device).view(-1, d)
        return index[:, :n].flatten(), index[:, n:].flatten()

    def order(
        self, xt: Tensor, sample_ids: Tensor, vocab: Vocab, masks_in_order: bool = False
    ) -> Tensor:
        """The positions in sorted order: clean before masked, each group in the order of a
        Philox word keyed by (seed, sample id, position), so any split of the batch and any
        device sort alike (integer keys, stable sort); `masks_in_order` keeps the masks left
        to right (the sequential branch). xt [B, L] -> [B, L] int64"""
        keys = row_keys(self.seed, STREAM_ORDER, sample_ids)
        position = torch.arange(xt.shape[1], device=xt.device)
        words = philox4x32(keys.unsqueeze(1), position)[0]
        masked = xt == vocab.mask_id
        if masks_in_order:
            words = torch.where(masked, position, words)
        return (masked.long() * 2**32 + words).argsort(dim=1, stable=True)

    def _divisor(self, t: Tensor) -> Tensor:
        """Diffusion rows: the ELBO's 1/(-alpha'/(1 - alpha)) of the scaled schedule,
        t + offset (t at alpha_0 = 1, MDLM's bits), or 1 for cross_entropy; sequential rows
        (t = 0): 1. Each times (rows of its branch) / B, so the token mean is the sum of the
        two branches' token means. [B] -> [B] f32"""
        sequential = t == 0
        divisor = torch.ones_like(t)
        if self.loss_type == "elbo":
            offset = (1 - self.alpha_0) / (self.alpha_0 * (1 - EPS)) if self.alpha_0 else 0.0
            divisor = torch.where(sequential, 1.0, t + offset)
        branch_rows = torch.where(sequential, sequential.sum(), (~sequential).sum())
        return divisor * (branch_rows / len(t))

    def sample(
        self, model: Denoiser, vocab: Vocab, cfg: SamplingConfig, seq_len: int, start_id: int
    ) -> Samples:
        """From all-mask: a random order per sample, then slots decoded front to back: as
        many per step as the alpha_0-scaled schedule reveals (one count per step for the
        whole batch, so the caches stay aligned), then the rest one per step, left to right
        (docs/algorithms.md §9.3); each a draw from x̂ (top_p filters x̂). With cfg.kv_cache a
        step runs the slots decoded at the step before (committing their keys and values) and
        the slots it decodes; without, the whole sequence."""
        self.refuse_final_step(cfg)
        generator, device = torch.Generator().manual_seed(cfg.seed), model.device
        n = cfg.num_samples
        order = torch.stack([torch.randperm(seq_len, generator=generator) for _ in range(n)])
        counts = self._decode_counts(seq_len, cfg.steps, generator)
        diffused = sum(counts)
        order[:, diffused:] = order[:, diffused:].sort(dim=1).values  # the sequential tail
        tail = seq_len - diffused
        if tail:
            counts += [tail] if self.alpha_0 == 1 else [1] * tail
        order = order.to(device)
        tokens = torch.full((n, seq_len), vocab.mask_id, dtype=torch.int64, device=device)
        s0 = torch.zeros(n, device=device)
        decode = model.decoder() if cfg.kv_cache else None
        start = previous = 0
        for count in counts:
            end = start + count
            if decode is None:
                logits = model.logits(tokens, s0, order)[:, start:end]
            else:
                window = slice(start - previous, end)
                logits = decode(tokens[:, window], s0, order[:, window], keep=previous)
                logits = logits[:, previous:]
            tokens[:, start:end] = categorical(denoiser(logits, vocab, cfg.top_p), generator)
            start, previous = end, count
        return Samples(torch.empty_like(tokens).scatter_(1, order, tokens), len(counts))

    def _decode_counts(self, seq_len: int, steps: int, generator: torch.Generator) -> list[int]:
        """How many slots each diffusion step decodes: the reveal probability (alpha_s -
        alpha_t) / (1 - alpha_t) of alpha_0 alpha_t on each remaining slot, drawn once for the
        batch on the host; steps that decode nothing are skipped."""
        grid = torch.linspace(1.0, T_MIN, steps + 1, dtype=torch.float64).tolist()
        counts, remaining = [], seq_len
        for i in range(steps):
            a_t, a_s = self.alpha_0 * alpha(grid[i]), self.alpha_0 * alpha(grid[i + 1])
            u = torch.rand(remaining, dtype=torch.float64, generator=generator)
            counts.append(int((u < (a_s - a_t) / (1 - a_t)).sum()))
            remaining -= counts[-1]
        return [count for count in counts if count > 0]
