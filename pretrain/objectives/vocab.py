"""Which token ids are real: the support of noise, of predictions and of samples.

The mask id, padding ids and the vocabulary padding added for tensor parallelism are never
noised to, never predicted and never sampled; Duo's K is the number of real ids (fixes
docs/pitfalls.md P10 of the reference, whose uniform noise also produced [MASK] and special ids).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from dlm_pretrain.common.errors import ConfigError
from torch import Tensor


@dataclass(frozen=True)
class Vocab:
    size: int  # V: rows of the embedding / columns of the logits, padding included
    mask_id: int
    excluded: frozenset[int]  # mask, pad and every other id that never occurs in the data
    real: Tensor = field(compare=False)  # [V] bool: may be noised to, predicted and sampled
    real_ids: Tensor = field(compare=False)  # [K] int64: the real ids in increasing order

    @classmethod
    def build(cls, size: int, mask_id: int, never_in_data: Iterable[int | None] = ()) -> Vocab:
        excluded = frozenset({mask_id, *(i for i in never_in_data if i is not None)})
        if not 0 <= mask_id < size or any(not 0 <= i < size for i in excluded):
            raise ConfigError(f"special ids {sorted(excluded)} must lie in [0, {size})")
        real = torch.ones(size, dtype=torch.bool)
        real[list(excluded)] = False
        return cls(size, mask_id, excluded, real, torch.nonzero(real).flatten())

    def to(self, device: torch.device) -> Vocab:
        """The same vocabulary with its tensors on `device` (copied once, not per step)."""
        return replace(self, real=self.real.to(device), real_ids=self.real_ids.to(device))

    @property
    def num_real(self) -> int:
        """K of the uniform-state process."""
        return self.size - len(self.excluded)
