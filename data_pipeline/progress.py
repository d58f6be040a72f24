"""Progress of long work: a tqdm bar on a terminal, otherwise a log line every few seconds."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


def _si(x: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.1f}{unit}"
        x /= 1000
    return f"{x:.1f}T"


class Progress:
    """Counts `total` units of work and extra counters; shows the rate of each and an ETA."""

    def __init__(self, total: int, desc: str, unit: str = "B", interval_s: float = 10.0) -> None:
        self.total, self.desc, self.unit, self.interval_s = total, desc, unit, interval_s
        self.done = 0
        self.counters: dict[str, int] = {}
        self.start = self._last_log = time.perf_counter()
        self._bar = (
            tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)
            if sys.stderr.isatty()
            else None
        )

    def update(self, n: int, **counters: int) -> None:
        self.done += n
        for name, value in counters.items():
            self.counters[name] = self.counters.get(name, 0) + value
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix_str(self.rates(), refresh=False)
        elif time.perf_counter() - self._last_log >= self.interval_s:
            self._last_log = time.perf_counter()
            log.info("%s: %s", self.desc, self.summary())

    def rates(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return ", ".join(f"{_si(v / elapsed)} {k}/s" for k, v in self.counters.items())

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.start
        frac = self.done / self.total if self.total else 1.0
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        return (
            f"{100 * frac:.0f}% of {_si(self.total)}{self.unit}, {self.rates()}, "
            f"elapsed {elapsed:.0f}s, ETA {eta:.0f}s"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
