"""The word_cycle task's documents, read from beside this file whatever the working directory
(a relative `data_files` in the YAML would be read from the working directory)."""

from __future__ import annotations

from pathlib import Path

import datasets


def load(**_metadata: object) -> datasets.DatasetDict:
    """lm-eval's custom_dataset hook; it passes the task's metadata, which is not needed."""
    return datasets.load_dataset(
        "json", data_files={"test": str(Path(__file__).with_suffix(".jsonl"))}
    )
