"""One smoke check's result and how a check is run, shared by launch.smoke (the checks in
order, devices, collectives, training) and launch.smoke_kernels (the Triton kernels against
their twins): both import this module, so neither imports the other upward.

A check ends as a `Check` line with a status; an exception inside it is a finding, not a
crash (`attempt`), and its figures are timed the same way everywhere (`timed`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
FAIL, SKIP, PASS = "FAIL", "SKIP", "PASS"
STATUSES = (FAIL, SKIP, PASS)  # worst first: the ranks agree on the minimum


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # PASS, SKIP or FAIL
    detail: str

    def line(self) -> str:
        return f"{self.status}  {self.name:<29}  {self.detail}"


def failed(name: str, e: Exception) -> Check:
    log.error("%s failed", name, exc_info=e)
    return Check(name, FAIL, f"{type(e).__name__}: {e}")


def attempt(name: str, check: Callable[[], Check]) -> Check:
    """The check's result, or FAIL with the error (traceback in the log): an exception is a
    finding here, and the next check still runs."""
    try:
        return check()
    except Exception as e:
        return failed(name, e)


def timed(fn: Callable, device: torch.device, repeats: int) -> tuple:
    """fn's first result and the ms per call: of the calls after the first (which compiles and
    warms up), or with no repeats of the first one."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    start = time.perf_counter()
    result = fn()
    synchronize()
    if repeats:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize()
    return result, (time.perf_counter() - start) / max(repeats, 1) * 1e3
