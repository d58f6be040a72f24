"""What a `dlm` command shows: our lines only, unless -v/--verbose.

megatron-core, DeepSpeed and torch announce themselves at length: megatron's "Transformer
Engine and Apex are not installed" warnings and INFO lines, torch's "No CUDA runtime is
found", DeepSpeed's accelerator warning (its own logger, straight to stdout), its op-builder
compiler lines, and its seed, topology and build `print`s; deprecation warnings besides. By
default a log record is shown if it comes from one of our loggers (`dlm`, `dlm_pretrain.*`)
or is an error; warnings go through logging, so the same rule applies to them; and the
libraries' `print`s inside `hidden_prints()` are dropped. With -v everything is shown.

The choice travels to launched workers in the environment (DLM_VERBOSE), the one variable
the CLI sets for them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import torch.distributed as dist

VERBOSE_ENV = "DLM_VERBOSE"
OUR_LOGGERS = ("dlm",)  # `dlm` and `dlm_pretrain.*`: record.name starts with it


def verbose_requested(flag: bool) -> bool:
    """-v on this command line, or a parent `dlm -v` that launched this process."""
    return flag or os.environ.get(VERBOSE_ENV) == "1"


def configure_output(verbose: bool) -> None:
    """Logging for this process (INFO on rank 0, warnings elsewhere) and, unless `verbose`,
    third-party records below ERROR hidden. Call once, first thing; the choice is exported
    to the processes this one launches."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    handler = logging.StreamHandler(sys.stdout)  # bound now: hidden_prints() leaves it alone
    handler.addFilter(_RankZeroOnly())
    if not verbose:
        handler.addFilter(_OursOnly())
        # DeepSpeed's logger writes to stdout itself and resets its level when imported; a
        # filter added before that import stays.
        deepspeed = logging.getLogger("DeepSpeed")
        if not any(isinstance(f, _OursOnly) for f in deepspeed.filters):
            deepspeed.addFilter(_OursOnly())
    logging.captureWarnings(True)  # warnings.warn -> logger py.warnings, filtered as above
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=[handler]
    )


@contextlib.contextmanager
def hidden_prints(verbose: bool) -> Iterator[None]:
    """Drops what third-party code `print`s to stdout (our own output is logged or printed
    outside); errors and tracebacks go to stderr, untouched."""
    if verbose:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


class _OursOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(OUR_LOGGERS) or record.levelno >= logging.ERROR


class _RankZeroOnly(logging.Filter):
    """Ranks other than 0 show warnings and errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return rank == 0 or record.levelno >= logging.WARNING
