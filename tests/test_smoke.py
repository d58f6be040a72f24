"""The smoke check end to end on CPU (Triton interpreted: conftest sets TRITON_INTERPRET=1)
on the test dataset: every check passes; a loss threshold that cannot be met fails the
training check alone and the exit code."""

from __future__ import annotations

import logging
import re
import sys

import pytest
from dlm_pretrain.launch.smoke import main

pytestmark = pytest.mark.slow  # several processes or whole runs: not in the quick subset

CHECKS = [
    "devices",
    "collectives",
    "kernel head+cross-entropy float32",
    "kernel head+duo float32",
    "kernel head+cross-entropy bfloat16",
    "kernel head+duo bfloat16",
    "kernel noise mdlm",
    "kernel noise duo",
    "kernel noise gidd",
    "training",
    "sample",
    "checkpoint reload",
    "throughput",
    "smoke check",
]
QUICK = ["--size", "tiny", "optim.lr=3e-3"]  # as tests/test_train.py's BASE


def _statuses(capsys) -> dict[str, str]:
    """Check name -> status, from lines "STATUS  name  detail" (names have single spaces);
    the terminal shows nothing else."""
    lines = capsys.readouterr().out.splitlines()
    return {name: status for status, name, _ in (re.split(r"\s{2,}", x, maxsplit=2) for x in lines)}


def test_every_check_passes_on_cpu(dataset, tmp_path, capsys):
    """Run as `dlm smoke` runs it, after the CLI gave the root logger a terminal handler: the
    terminal still shows the check lines alone (each rank's records go to its log)."""
    terminal = logging.StreamHandler(sys.stdout)
    logging.getLogger().addHandler(terminal)
    try:
        code = main(["--out", str(tmp_path), "--data", str(dataset), "--steps", "8", *QUICK])
    finally:
        logging.getLogger().removeHandler(terminal)
    statuses = _statuses(capsys)
    assert list(statuses) == CHECKS
    assert set(statuses.values()) == {"PASS"}, statuses
    assert code == 0
    assert "validation at step 0" in (tmp_path / "smoke.rank0.log").read_text()


def test_a_failed_check_fails_the_exit_code(dataset, tmp_path, capsys):
    """The loss cannot fall below 0 x its start: training fails, the rest still runs."""
    args = ["--out", str(tmp_path), "--data", str(dataset), "--steps", "2", *QUICK]
    assert main([*args, "--max-loss-ratio", "0"]) == 1
    statuses = _statuses(capsys)
    assert {name for name, status in statuses.items() if status == "FAIL"} == {
        "training",
        "smoke check",
    }
