"""Crash-safe writes: a file is either its old content or its new content, never half."""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dlm_pretrain.common.errors import CheckpointError


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, rename over `path`, then fsync
    the directory so that the rename itself survives a power loss."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Persist the entries of `directory` (renames, new files) on POSIX file systems."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def new_directory(out: Path, what: str) -> Iterator[Path]:
    """A staging directory beside `out`, renamed to `out` when the block succeeds and removed
    when it fails: `out` is whole or absent. Refuses an `out` that is not empty."""
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} is not empty; give a new directory for the {what}")
    staging = out.with_name(f".incomplete-{out.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    staging.rename(out)
