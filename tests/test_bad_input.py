"""Bad input fails early, naming the problem and the fix, or is skipped and counted."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_documents, write_jsonl
from dlm_pretrain.common.errors import ConfigError, DataError
from dlm_pretrain.data_pipeline import (
    PrepareConfig,
    TrainLoader,
    open_dataset,
    prepare_dataset,
    verify_dataset,
)
from dlm_pretrain.launch.cli import main
from dlm_pretrain.pretrain.config import load_config


def _cfg(out: Path, corpus: list[Path], **kw) -> PrepareConfig:
    base = dict(vocab_size=400, seq_len=64, shard_size=40, val_fraction=0.1, workers=1)
    return PrepareConfig(out=str(out), corpus=tuple(map(str, corpus)), **(base | kw))


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"matches no file.*quote globs"):
        prepare_dataset(_cfg(tmp_path / "out", [tmp_path / "nothing-*.jsonl"]))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        prepare_dataset(_cfg(tmp_path / "out", [tmp_path / "empty.txt"]))
    assert not (tmp_path / "out").exists(), "nothing is written before the corpus is checked"


def test_unsupported_file_type(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported corpus file type.*\.jsonl"):
        prepare_dataset(_cfg(tmp_path / "out", [tmp_path / "x.csv"]))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("seq_len", 1, "seq_len=1"),
        ("val_fraction", 1.0, "val_fraction=1.0"),
        ("shard_size", 0, "shard_size=0"),
        ("vocab_size", 100, "vocab_size=100"),
    ],
)
def test_config_values_are_checked_on_construction(tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, [], **{key: value})


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.micro_batch=0", r"train\.micro_batch=0 is out of range: must be greater"),
        ("train.log_every=0", r"train\.log_every=0 is out of range"),
        ("train.val_every=-1", r"train\.val_every=-1 is out of range"),
        ("data.num_workers=-1", r"data\.num_workers=-1 is out of range"),
        ("optim.beta2=1.0", r"optim\.beta2=1\.0 is out of range: must be less than 1"),
        ("model.dropout=1.5", r"model\.dropout=1\.5 is out of range"),
        ("train.flops_convention=exatc", r"'exatc' is not one of .*did you mean 'exact'"),
        ("objective.name=mdml", r"objective\.name='mdml' is not one of .*did you mean 'mdlm'"),
        ("objective.fused=false", r"unknown config key objective\.fused"),
        ("objective.gamma=3", r"objective\.gamma=3 is out of range: must be less than or equal"),
        ("objective.loss_weighting=none", r"'none' is not one of 'dynamic', 'clip' or 'elbo'"),
        ("objective.alpha_0=1.5", r"objective\.alpha_0=1\.5 is out of range"),
        (
            "objective.name=esolm objective.alpha_0=0.5",
            r"objective\.alpha_0=0\.5 with objective\.batch_split=1\.0: .* must equal it",
        ),
        (
            "objective.name=esolm objective.alpha_0=0.5 objective.batch_split=0.3",
            r"puts 3 of every 10 rows .* use a micro_batch that is a multiple of 10",
        ),
    ],
)
def test_run_config_values_are_checked_at_load(override, match):
    """Regressions: micro_batch=0 was a ZeroDivisionError, log_every=0 crashed at step 1 and a
    misspelt flops_convention was a bare ValueError after the process groups existed."""
    with pytest.raises(ConfigError, match=match):
        load_config(None, override.split())


def test_an_argument_with_equals_is_an_override_not_a_preset(tmp_path, capsys):
    """Regression: `dlm train data.path=X` was refused as "no preset 'data.path=X'"."""
    assert main(["train", f"data.path={tmp_path}", "train.log_every=0"]) == 2
    err = capsys.readouterr().err
    assert "train.log_every=0" in err and "preset" not in err


def test_bad_jsonl_lines_are_skipped_and_counted_or_fatal_with_strict(tmp_path):
    docs = random_documents(300, seed=5)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    with open(path, "ab") as f:
        f.write(b'{"text": "unterminated\n')
        f.write(json.dumps({"body": "wrong field"}).encode() + b"\n")
        f.write(
            json.dumps({"text": "caf\xe9 latin-1 bytes"}).encode().replace(b"\\u00e9", b"\xe9")
            + b"\n"
        )
        f.write(json.dumps({"text": "   \n "}).encode() + b"\n")
    manifest = prepare_dataset(_cfg(tmp_path / "out", [path]))
    corpus = manifest.corpus
    assert corpus["skipped_bad_json"] == 1
    assert corpus["skipped_missing_field"] == 1
    assert corpus["decoded_with_replacement"] == 1
    assert corpus["skipped_empty"] == 1
    assert corpus["documents"] == len(docs) + 1
    with pytest.raises(DataError, match=r"c\.jsonl byte \d+: not valid JSON.*drop strict"):
        prepare_dataset(_cfg(tmp_path / "strict", [path], strict=True))


def test_more_distinct_characters_than_the_vocabulary_asks_to_raise_it(tmp_path):
    """Every character needs a piece (code must round-trip exactly): a corpus of 600 CJK
    characters cannot be held by 400 pieces, and the error names the size that can."""
    rng = random.Random(3)
    characters = [chr(0x4E00 + i) for i in range(600)]
    docs = ["".join(rng.choice(characters) for _ in range(200)) for _ in range(200)]
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    with pytest.raises(DataError, match=r"need (\d+); raise vocab_size to at least \1") as error:
        prepare_dataset(_cfg(tmp_path / "out", [path]))
    assert int(re.search(r"at least (\d+)", str(error.value))[1]) > 600
    assert not any((tmp_path / "out").rglob("*")), "the failure wrote files"


def test_corpus_smaller_than_one_sequence(tmp_path):
    """One document is never split between train and val, so val can end up empty."""
    path = write_jsonl(
        tmp_path / "c.jsonl", random_documents(1, seed=2, min_words=900, max_words=900)
    )
    with pytest.raises(DataError, match=r"the (train|val) split got .* document\(s\).*seq_len"):
        prepare_dataset(_cfg(tmp_path / "out", [path], vocab_size=330, val_fraction=0.5))


def test_missing_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", random_documents(5, seed=2))
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(_cfg(tmp_path / "out", [path], tokenizer=str(tmp_path / "none.model")))


def _copy(dataset: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(dataset, out)
    return out


def test_altered_and_truncated_shards_are_named_by_verify_and_reader(dataset, tmp_path, capsys):
    root = _copy(dataset, tmp_path)
    assert main(["verify", str(root)]) == 0
    altered, truncated = root / "train/shard-000001.tar", root / "val/shard-000000.tar"
    data = bytearray(altered.read_bytes())
    data[2000] ^= 0xFF  # inside a sample's token bytes: same size, different content
    altered.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:5000])
    problems = verify_dataset(root)
    assert len(problems) == 2
    assert "shard-000001.tar is corrupt" in problems[0]
    assert "val/shard-000000.tar" in problems[1]
    assert main(["verify", str(root)]) == 1
    assert "shard-000001.tar" in capsys.readouterr().out
    with pytest.raises(DataError, match="truncated or altered"):
        open_dataset(root)  # the size check on opening catches the truncated shard
    truncated.write_bytes((dataset / "val/shard-000000.tar").read_bytes())
    manifest = open_dataset(root)
    loader = TrainLoader(
        root, manifest, micro_batch_size=8, dp_rank=0, dp_size=1, num_workers=0, seed=0
    )
    with pytest.raises(DataError, match=r"train/shard-000001\.tar is corrupt"):
        for _ in loader:
            pass


def test_seq_len_and_tokenizer_must_match_the_manifest(dataset):
    with pytest.raises(DataError, match=r"seq_len=128 .* seq_len=64"):
        open_dataset(dataset, seq_len=128)
    with pytest.raises(DataError, match="does not match"):
        open_dataset(dataset, tokenizer_sha256="0" * 64)
    assert open_dataset(dataset, seq_len=64).seq_len == 64


def test_unfinished_directory_is_not_a_dataset(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="not a finished dataset"):
        open_dataset(tmp_path)


def test_killed_prepare_leaves_no_dataset_and_a_rerun_cleans_up(tmp_path, dataset):
    """A SIGKILL mid-run (tests/kill_at.py: once the first train shard is renamed and the
    second is open) leaves no manifest; re-running removes temporary and stale shards."""
    corpus = write_jsonl(tmp_path / "big.jsonl", random_documents(300, seed=9))
    out = tmp_path / "out"
    shutil.copytree(dataset, out)  # an older finished dataset in the same place
    (out / "train/shard-999999.tar").write_bytes(b"stale")
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("kill_at.py")),
        "prepare:1",
        "prepare",
        f"out={out}",
        f"corpus={corpus}",
        "vocab_size=400",
        "seq_len=64",
        "shard_size=50",
        "workers=1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert list(out.glob("train/*.tar.tmp"))
    with pytest.raises(DataError, match="not a finished dataset"):
        open_dataset(out)
    assert main(cmd[3:]) == 0
    assert not list(out.rglob("*.tmp"))
    assert not (out / "train/shard-999999.tar").exists()
    assert verify_dataset(out) == []
