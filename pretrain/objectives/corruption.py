"""Per-token corruption, keyed by (seed, global sample index, position) (docs/algorithms.md §3).

Each token gets two uint32 words from Philox: one decides whether it is corrupted (with
probability 1 - alpha_t), one what it becomes (Duo: a uniform real id; MDLM: the mask).
On CUDA the fused Triton kernel (pretrain/kernels/triton_noise.py) draws the same words and
writes xt in one pass; this module's PyTorch form is its CPU twin, bit for bit.
"""

from __future__ import annotations

import torch
from dlm_pretrain.pretrain.kernels import backend_name
from dlm_pretrain.pretrain.objectives.randomness import (
    STREAM_CORRUPT,
    below,
    philox4x32,
    row_keys,
    uniform,
)
from dlm_pretrain.pretrain.objectives.schedule import alpha
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor


def corrupt(x0: Tensor, t: Tensor, sample_ids: Tensor, seed: int, vocab: Vocab, uniform_ids: bool):
    """xt: each token replaced with probability 1 - alpha_t by a uniform real id
    (`uniform_ids`) or by the mask id. x0 [B, L] int64, t [B], sample_ids [B] -> [B, L], all
    on one device (the Triton kernel on CUDA, this module's form elsewhere)."""
    keys = row_keys(seed, STREAM_CORRUPT, sample_ids)
    threshold = 1 - alpha(t).float()  # corrupted iff uniform(w0) < 1 - alpha_t
    if backend_name(x0) == "triton":
        from dlm_pretrain.pretrain.kernels.triton_noise import corrupt as corrupt_kernel

        return corrupt_kernel(x0, keys, threshold, vocab, uniform_ids)
    w0, w1, _, _ = philox4x32(keys.unsqueeze(1), torch.arange(x0.shape[1], device=x0.device))
    if uniform_ids:
        replacement = vocab.real_ids[below(w1, vocab.num_real)]
    else:
        replacement = torch.full_like(x0, vocab.mask_id)
    return torch.where(uniform(w0) < threshold.unsqueeze(1), replacement, x0)
