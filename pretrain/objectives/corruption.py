"""Per-token corruption, keyed by (seed, global sample index, position) (docs/algorithms.md §3).

Each token gets two uint32 words from Philox: one uniform u decides its fate against two
per-row thresholds (the mask below mask_p, a uniform real id below corrupt_p, else kept), the
other which real id a uniform replacement is. MDLM masks (mask_p = corrupt_p = 1 - alpha_t),
Duo replaces (mask_p = 0), GIDD does both.
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
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from torch import Tensor


def corrupt(
    x0: Tensor, sample_ids: Tensor, seed: int, vocab: Vocab, corrupt_p: Tensor, mask_p: Tensor
) -> Tensor:
    """xt: each token becomes the mask id with probability mask_p, a uniform real id
    (possibly itself) with probability corrupt_p - mask_p, else stays. x0 [B, L] int64,
    sample_ids [B], corrupt_p >= mask_p [B] f32 -> [B, L], all on one device (the Triton kernel
    on CUDA, this module's form elsewhere)."""
    keys = row_keys(seed, STREAM_CORRUPT, sample_ids)
    corrupt_p, mask_p = corrupt_p.float(), mask_p.float()
    if backend_name(x0) == "triton":
        from dlm_pretrain.pretrain.kernels.triton_noise import corrupt as corrupt_kernel

        return corrupt_kernel(x0, keys, corrupt_p, mask_p, vocab)
    w0, w1, _, _ = philox4x32(keys.unsqueeze(1), torch.arange(x0.shape[1], device=x0.device))
    u = uniform(w0)
    replaced = torch.where(
        u < corrupt_p.unsqueeze(1), vocab.real_ids[below(w1, vocab.num_real)], x0
    )
    return torch.where(u < mask_p.unsqueeze(1), vocab.mask_id, replaced)
