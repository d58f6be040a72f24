"""One dlm process that SIGKILLs itself at a chosen point, so that a test of interrupted work
kills inside that work every time, on any machine (no polling for a window to hit):

    python tests/kill_at.py save:STEP:POINT PRESET [section.key=value ...]
        `python -m dlm_pretrain.launch.train PRESET ...`, killed inside step STEP's checkpoint
        save (pretrain/checkpoint.py) at POINT:
            shards  the first file of the engine's shards is written into .incomplete-TAG
            rename  every shard is written; .incomplete-TAG/TAG is not renamed to TAG yet
            latest  TAG is renamed; `latest` does not name it yet
    python tests/kill_at.py validated:STEP PRESET [section.key=value ...]
        the same, killed once step STEP's validation is in val_log.jsonl and MLflow (before
        its samples and its checkpoint)
    python tests/kill_at.py prepare:N prepare ...
        `dlm prepare ...`, killed once train shard N-1 is renamed and shard N is open under
        its temporary name
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

SAVE_POINTS = ("shards", "rename", "latest")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _in_save(step: int, point: str) -> None:
    """Wrap the two writers a save goes through: DeepSpeed writes its shards with torch.save,
    checkpoint_files.py the meta file (before the rename), checkpoint.py `latest`, both with
    write_atomic."""
    import torch
    from dlm_pretrain.pretrain import checkpoint, checkpoint_files

    tag = f"step{step:08d}"
    staging = f".incomplete-{tag}"
    torch_save, write_atomic = torch.save, checkpoint.write_atomic

    def save_then_die(obj, f, *args, **kwargs):
        torch_save(obj, f, *args, **kwargs)
        if point == "shards" and staging in str(f):
            _die()

    def die_then_write(path: Path, data: bytes) -> None:
        if point == "rename" and path.name == checkpoint.META_FILE and staging in str(path):
            _die()
        if point == "latest" and path.name == checkpoint.LATEST and data == tag.encode():
            _die()
        write_atomic(path, data)

    torch.save = save_then_die
    checkpoint.write_atomic = checkpoint_files.write_atomic = die_then_write


def _after_validation(step: int) -> None:
    from dlm_pretrain.pretrain.tracking import Tracker

    log_metrics = Tracker.log_metrics

    def log_then_die(self, metrics: dict, at: int) -> None:
        log_metrics(self, metrics, at)
        if at == step and "val/loss" in metrics:
            _die()

    Tracker.log_metrics = log_then_die


def _in_prepare(shard: int) -> None:
    from dlm_pretrain.data_pipeline.shards import ShardWriter

    open_shard = ShardWriter._open

    def open_then_die(self) -> None:
        open_shard(self)
        if self.split == "train" and len(self.shards) == shard:
            _die()

    ShardWriter._open = open_then_die


if __name__ == "__main__":
    where, *args = sys.argv[1:]
    what, *at = where.split(":")
    if what == "save" and len(at) == 2 and at[1] in SAVE_POINTS:
        from dlm_pretrain.launch.train import main

        _in_save(int(at[0]), at[1])
    elif what == "validated" and len(at) == 1:
        from dlm_pretrain.launch.train import main

        _after_validation(int(at[0]))
    elif what == "prepare" and len(at) == 1:
        from dlm_pretrain.launch.cli import main

        _in_prepare(int(at[0]))
    else:
        sys.exit(
            f"kill_at.py: {where!r} is none of save:STEP:{'|'.join(SAVE_POINTS)}, "
            "validated:STEP, prepare:N"
        )
    sys.exit(main(args))
