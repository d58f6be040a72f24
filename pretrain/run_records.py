"""The run's records in its directory: a line per step (train_log.jsonl), a line per
validation (val_log.jsonl), the samples, and the loss curves they give (rank 0).

A restart continues from the last checkpoint, so whatever was recorded after it is redone:
`rewind` first cuts every record back to the checkpoint's step. After any number of
restarts each step then appears once, with the value of the run that survived.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from dlm_pretrain.common.errors import CheckpointError
from dlm_pretrain.common.files import write_atomic

TRAIN_LOG, VAL_LOG = "train_log.jsonl", "val_log.jsonl"
SAMPLES = "samples"
TRAIN_CURVE, VAL_CURVE = "train (objective)", "validation (ELBO)"
_SAMPLE_FILE = re.compile(r"step(\d+)\.txt")


def sample_path(run_dir: Path, step: int) -> Path:
    return run_dir / SAMPLES / f"step{step:08d}.txt"


def remove_samples_after(folder: Path, last_step: int | None) -> None:
    """Samples in `folder` written after `last_step` (all of them for None)."""
    for path in folder.glob("step*.txt"):
        match = _SAMPLE_FILE.fullmatch(path.name)
        if match and (last_step is None or int(match[1]) > last_step):
            path.unlink()


class RunRecords:
    """The records of the run so far, cut back to the checkpoint at `last_step` (nothing
    survives without one): read on every rank before any work, so that a damaged file stops
    them all; `rewind` (rank 0) writes the cut. Then appends, keeping the curves."""

    def __init__(self, run_dir: Path, last_step: int | None) -> None:
        self.run_dir, self.last_step = run_dir, last_step
        self._kept = {name: _surviving(run_dir / name, last_step) for name in (TRAIN_LOG, VAL_LOG)}
        self.train = [(r["step"], r["loss"]) for r in self._kept[TRAIN_LOG] if _finite(r)]
        self.validation = [(r["step"], r["loss"]) for r in self._kept[VAL_LOG]]

    def rewind(self) -> None:
        """Write the records the checkpoint covers back, and remove later samples."""
        for name, kept in self._kept.items():
            text = "".join(json.dumps(r) + "\n" for r in kept)
            write_atomic(self.run_dir / name, text.encode())
        self._kept.clear()
        (self.run_dir / SAMPLES).mkdir(parents=True, exist_ok=True)
        remove_samples_after(self.run_dir / SAMPLES, self.last_step)

    def add_step(self, step: int, loss: float, grad_norm: float) -> None:
        """Every step at full precision, for exact comparisons between runs."""
        record = {"step": step, "loss": loss, "grad_norm": grad_norm}
        self._append(TRAIN_LOG, record)
        if _finite(record):
            self.train.append((step, loss))

    def add_validation(self, step: int, loss: float) -> None:
        self._append(VAL_LOG, {"step": step, "loss": loss})
        self.validation.append((step, loss))

    def _append(self, name: str, record: dict) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def last_validation(self) -> dict | None:
        return (
            dict(zip(("step", "loss"), self.validation[-1], strict=True))
            if self.validation
            else None
        )

    def curves(self) -> dict[str, list[tuple[int, float]]]:
        """(step, loss) of the finite training losses and of the validations."""
        return {TRAIN_CURVE: self.train, VAL_CURVE: self.validation}


def _surviving(path: Path, last_step: int | None) -> list[dict]:
    """The records at or before `last_step`, one per step: the last written (files from
    before rewinding existed hold redone steps twice)."""
    if last_step is None:
        return []
    by_step = {r["step"]: r for r in read_records(path)}
    return [by_step[step] for step in sorted(by_step) if step <= last_step]


def read_records(path: Path) -> list[dict]:
    """The lines of a jsonl record file; a last line cut short by a kill is left out."""
    if not path.is_file():
        return []
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if i < len(lines) - 1:
                raise CheckpointError(
                    f"{path} line {i + 1} is not a JSON record ({error}); remove the line"
                ) from error
    return records


def _finite(record: dict) -> bool:
    return math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
