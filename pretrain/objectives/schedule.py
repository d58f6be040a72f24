"""The log-linear noise schedule and the stratified draw of t (docs/algorithms.md §2)."""

from __future__ import annotations

import torch
from dlm_pretrain.pretrain.objectives.randomness import STREAM_TIME, philox4x32, row_keys, uniform
from torch import Tensor

EPS = 1e-3  # alpha_1 = EPS and t >= EPS, as the reference (chosen there to match SEDD)


def alpha(t: Tensor) -> Tensor:
    """alpha_t = 1 - (1 - eps) t: the probability a token is still clean. [B] -> [B]"""
    return 1 - (1 - EPS) * t


def alpha_prime(t: Tensor) -> Tensor:
    """d alpha_t / dt = -(1 - eps), constant. [B] -> [B]"""
    return torch.full_like(t, -(1 - EPS))


def sigma(t: Tensor) -> Tensor:
    """sigma_t = -log alpha_t, the scalar the time embedding sees (Duo). [B] -> [B]"""
    return -torch.log(alpha(t))


def sample_t(seed: int, step: int, rows: Tensor, global_batch: int, t_max: float = 1.0) -> Tensor:
    """Antithetic t for the given rows of a global batch: row p owns stratum [p/G, (p+1)/G)
    of [eps, t_max) (t_max < 1 for objectives whose weights diverge at t = 1, GIDD).

    A function of (seed, step, p) only, so any split of the global batch over ranks and
    micro-batches gives each row the same t.
    rows int64 [b] in [0, G) -> t float32 [b] in [eps, t_max), on rows' device
    """
    keys = row_keys(seed, STREAM_TIME, torch.full_like(rows, step))
    u = uniform(philox4x32(keys, rows)[0]).double()
    t = (u + rows.double()) / global_batch
    return ((t_max - EPS) * t + EPS).float()
