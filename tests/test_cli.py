"""`dlm --help` lists every subcommand; each subcommand documents every option."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from dlm_pretrain.data_pipeline import PrepareConfig
from dlm_pretrain.launch.cli import main


def _help(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dlm_pretrain.launch.cli", *args, "--help"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_top_level_help_lists_each_subcommand_with_a_line():
    text = _help()
    for name in ("prepare", "verify", "train", "sample", "smoke"):
        line = next(line for line in text.splitlines() if line.strip().startswith(name))
        assert len(line.split()) > 2, f"{name} has no one-line description"


def test_prepare_help_documents_every_config_field():
    text = _help("prepare")
    for f in dataclasses.fields(PrepareConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert f.metadata["help"].split()[0] in text


def test_prepare_and_verify_through_the_cli(tmp_path, corpus_docs, capsys):
    from conftest import write_jsonl

    corpus = write_jsonl(tmp_path / "c.jsonl", corpus_docs[:300])
    out = tmp_path / "out"
    args = ["prepare", "--out", str(out), "--corpus", str(corpus), "--vocab-size", "400"]
    assert main([*args, "--seq-len", "32", "--shard-size", "30", "--workers", "2"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "not a finished dataset" in capsys.readouterr().err


def test_train_refuses_a_layout_that_does_not_split_before_launching(dataset, tmp_path, capsys):
    common = ["train", "default", f"data.path={dataset}", f"train.run_dir={tmp_path / 'r'}"]
    assert main([*common, "--nproc", "3", "parallel.tensor=2"]) == 2
    assert "world size 3 is not divisible by parallel.tensor=2" in capsys.readouterr().err
    batch = ["train.global_batch=16", "train.micro_batch=16"]
    assert main([*common, "--nproc", "4", "parallel.tensor=2", *batch]) == 2
    assert "micro_batch=16 x data-parallel size 2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was launched


def test_smoke_takes_its_own_options():
    """`dlm smoke ARGS` is `python -m dlm_pretrain.launch.smoke ARGS`."""
    assert "--max-loss-ratio" in _help("smoke")
