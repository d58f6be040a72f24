"""Crash-safe writes: a file is either its old content or its new content, never half."""

import os
from pathlib import Path


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
