"""`dlm --help` lists every subcommand; each subcommand's help lists every config key with its
default; the quick commands import no heavy library and every command prints only our lines."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dlm_pretrain.common.config import keys
from dlm_pretrain.data_pipeline import PrepareConfig
from dlm_pretrain.launch.cli import _build_parser, main
from dlm_pretrain.pretrain.config import RunConfig, SamplingConfig

README = Path(__file__).parents[1] / "README.md"
HEAVY = ("megatron", "deepspeed", "triton")  # seconds to import: train, sample, smoke only
# What megatron-core, torch and DeepSpeed print on their own (launch/quiet.py).
THIRD_PARTY_LINES = (
    "Transformer Engine and Apex are not installed",
    "No CUDA runtime is found",
    "Setting accelerator to CPU",
    "SEED_LAYERS",
    "DeprecationWarning",
    "Detected Megatron Core",
)


def _dlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlm_pretrain.launch.cli", *args], capture_output=True, text=True
    )


def _help(*args: str) -> str:
    result = _dlm(*args, "--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_subcommand_is_documented_and_listed_with_a_line():
    """The parser's subcommands are README's `### dlm NAME` sections, and `dlm --help` gives
    each a one-line description."""
    sub = next(a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    documented = set(re.findall(r"^### `dlm ([\w-]+)", README.read_text(), re.MULTILINE))
    assert set(sub.choices) == documented
    text = _help()
    for name in sub.choices:
        line = next(line for line in text.splitlines() if line.strip().startswith(name))
        assert len(line.split()) > 2, f"{name} has no one-line description"


@pytest.mark.parametrize(
    ("command", "config_cls"),
    [("train", RunConfig), ("prepare", PrepareConfig), ("sample", SamplingConfig)],
)
def test_help_lists_every_config_key_with_its_default(command, config_cls):
    """Derived from the models: a key left out of the help, or shown with another default,
    fails."""
    text = _help(command)
    rows = list(keys(config_cls))
    assert rows
    for key in rows:
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(f"{key.name}=")), "")
        assert line.strip().startswith(f"{key.name}={key.default}"), f"{key.name} not in help"


def test_prepare_and_verify_through_the_cli(tmp_path, corpus_docs, capsys):
    from conftest import write_jsonl

    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_docs[:300])
    out = tmp_path / "out"
    args = ["prepare", f"out={out}", f"corpus={corpus}", "vocab_size=400"]
    assert main([*args, "seq_len=32", "shard_size=30", "workers=2"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "not a finished dataset" in capsys.readouterr().err
    assert main(["prepare", f"out={out}", "seq_len=1"]) == 2
    assert "seq_len=1 is out of range" in capsys.readouterr().err


def test_train_refuses_a_layout_that_does_not_split_before_launching(dataset, tmp_path, capsys):
    common = ["train", f"data.path={dataset}", f"train.run_dir={tmp_path / 'r'}"]
    assert main([*common, "--nproc", "3", "parallel.tensor=2"]) == 2
    assert "world size 3 is not divisible by parallel.tensor=2" in capsys.readouterr().err
    batch = ["train.global_batch=16", "train.micro_batch=16"]
    assert main([*common, "--nproc", "4", "parallel.tensor=2", *batch]) == 2
    assert "micro_batch=16 x data-parallel size 2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was launched


_IMPORTS = """
import sys
from dlm_pretrain.launch.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("imported:", sorted(m for m in {heavy} if m in sys.modules))
"""


@pytest.mark.parametrize("command", ["--help", "prepare", "verify"])
def test_quick_commands_import_no_heavy_library(command, dataset, tmp_path, corpus_docs):
    """megatron-core, DeepSpeed and Triton took ~8 s to import for every command."""
    from conftest import write_jsonl

    args = {
        "--help": ["--help"],
        "verify": ["verify", str(dataset)],
        "prepare": [
            "prepare",
            f"out={tmp_path / 'out'}",
            f"corpus={write_jsonl(tmp_path / 'c.jsonl', corpus_docs[:200])}",
            "vocab_size=400",
            "seq_len=32",
            "workers=1",
        ],
    }[command]
    script = _IMPORTS.format(heavy=HEAVY)
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300
    )
    assert "imported: []" in result.stdout, result.stdout + result.stderr


def test_a_command_prints_only_our_lines_unless_verbose(tmp_path):
    """`dlm sample` imports megatron-core and DeepSpeed, whose import-time notices
    ('Transformer Engine and Apex are not installed', DeepSpeed's accelerator warning) went
    to the terminal; they are hidden, and -v shows them."""
    missing = str(tmp_path / "no-run")
    quiet = _dlm("sample", missing)
    assert quiet.returncode == 2 and "error:" in quiet.stderr
    output = quiet.stdout + quiet.stderr
    assert not [line for line in THIRD_PARTY_LINES if line in output], output
    verbose = _dlm("-v", "sample", missing)
    assert "Transformer Engine and Apex are not installed" in verbose.stdout + verbose.stderr


def test_smoke_takes_its_own_options():
    """`dlm smoke ARGS` is `python -m dlm_pretrain.launch.smoke ARGS`."""
    assert "--max-loss-ratio" in _help("smoke")
