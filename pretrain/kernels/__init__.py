"""Fused kernels: the losses over vocabulary-parallel logits (losses.py) and the noising of
pretrain.objectives.corruption. Triton on CUDA (triton_backend.py, triton_noise.py), their
PyTorch twins elsewhere (chunked.py; corruption.py's own form)."""

from __future__ import annotations

import os

from dlm_pretrain.common.errors import ConfigError
from torch import Tensor

KERNELS_ENV = "DLM_KERNELS"  # "triton" or "chunked" overrides the choice by device


def backend_name(tensor: Tensor) -> str:
    """ "triton" for CUDA tensors, "chunked" (the PyTorch twins) otherwise; DLM_KERNELS
    forces one (Triton on CPU tensors needs TRITON_INTERPRET=1)."""
    name = os.environ.get(KERNELS_ENV) or ("triton" if tensor.is_cuda else "chunked")
    if name not in ("triton", "chunked"):
        raise ConfigError(f"{KERNELS_ENV}={name!r}; use triton or chunked, or leave it unset")
    return name
