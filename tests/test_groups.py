"""The process-group setup's guard against a build lock left by a killed run."""

import os
import time

from dlm_pretrain.parallel.groups import STALE_BUILD_LOCK_S, remove_stale_build_locks


def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    live = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir(parents=True)
        lock.touch()
    then = time.time() - STALE_BUILD_LOCK_S - 5
    os.utime(stale, (then, then))
    remove_stale_build_locks()
    assert not stale.exists()
    assert live.exists()  # a build in progress in another process keeps its lock
