"""The Hugging Face export encodes and decodes exactly as our sentencepiece tokenizer.

The reference is `Tokenizer.encode`/`decode`; the exported files are read by transformers in a
fresh interpreter that imports neither dlm_pretrain nor sentencepiece, as a user would.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from conftest import random_documents
from dlm_pretrain.checkpoints_tools.hf_tokenizer import read_sentencepiece, write_hf_tokenizer
from dlm_pretrain.common.errors import DataError
from dlm_pretrain.data_pipeline.tokenizer import Tokenizer, train_tokenizer

CODE = '''def step(batch, *, lr=3e-4):
\t"""Tabs,\tspaces and  doubled  spaces."""
    for i in range(10):
        if i % 2:
            yield batch[i]  # comment


'''
TEXTS = [
    "the model trains",
    "café naïve résumé Ærøskøbing",
    "中文字符和日本語のテキスト",
    "emoji 😀👍🏽 and a flag 🇫🇷",
    CODE,
    "  leading spaces",
    "trailing spaces   ",
    "\n\nnewlines first\n\n\nand after\n",
    "\t\ttabs\t \t mixed  \t",
    "a<mask>b <mask> <mask><mask>\n<mask>",
    "almost <mas k> and <mask",
    "          ",
    "x",
]
# Runs where transformers alone reads the exported files; sentencepiece is made unimportable.
LOADER = """
import importlib.machinery, json, sys

class NoSentencepiece(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] == "sentencepiece":
            return None
        return super().find_spec(name, path, target)

finders = sys.meta_path
sys.meta_path = [NoSentencepiece if f is importlib.machinery.PathFinder else f for f in finders]
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.load(sys.stdin)
ids = [tok.encode(t, add_special_tokens=False) for t in texts]
leaked = sorted(m for m in ("sentencepiece", "dlm_pretrain") if m in sys.modules)
print(json.dumps({
    "ids": ids,
    "decoded": [tok.decode(i) for i in ids],
    "mask_token_id": tok.mask_token_id,
    "special": [tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id],
    "len": len(tok),
    "leaked": leaked,
}))
"""


def _hf(out_dir: Path, texts: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(out_dir)],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _assert_same(tok: Tokenizer, out_dir: Path, texts: list[str]) -> dict:
    """Ids, decoded text and special ids from transformers equal ours."""
    hf = _hf(out_dir, texts)
    assert hf["leaked"] == []
    for text, want, got, decoded in zip(
        texts, tok.encode(texts), hf["ids"], hf["decoded"], strict=True
    ):
        assert got == want.tolist(), text
        assert decoded == tok.decode(want) == text
    assert hf["mask_token_id"] == tok.special.mask
    s = tok.special
    assert hf["special"] == [s.bos, s.eos, s.unk, s.pad]
    assert hf["len"] == tok.vocab_size
    return hf


def _spm_model(docs: list[str], **options) -> bytes:
    """A sentencepiece model trained directly, like train_tokenizer but with `options`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs),
        model_writer=model,
        **{
            "model_type": "bpe",
            "vocab_size": 400,
            "byte_fallback": True,
            "character_coverage": 1.0,
            "normalization_rule_name": "identity",
            "add_dummy_prefix": False,
            "remove_extra_whitespaces": False,
            "allow_whitespace_only_pieces": True,
            "minloglevel": 2,
            **options,
        },
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return random_documents(300, seed=77) + [CODE] * 20


def test_trained_tokenizer_round_trips(tmp_path, docs):
    tok = train_tokenizer(iter(docs), vocab_size=500)
    write_hf_tokenizer(tok, tmp_path, model_max_length=2048)
    texts = [*TEXTS, *random_documents(20, seed=78)]
    _assert_same(tok, tmp_path, texts)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 2048
    assert read_sentencepiece(tmp_path) == tok.model_bytes


def test_dataset_tokenizer_round_trips(tmp_path, dataset):
    """The tokenizer `dlm prepare` saved, re-imported from the export byte-identically."""
    tok = Tokenizer.load(dataset / "tokenizer.model")
    write_hf_tokenizer(tok, tmp_path)
    _assert_same(tok, tmp_path, TEXTS)
    assert Tokenizer(read_sentencepiece(tmp_path)).sha256 == tok.sha256


def test_appended_mask_is_never_read_from_text(tmp_path, docs):
    """Without a mask piece the mask is id V-1; sentencepiece reads "<mask>" as characters."""
    tok = Tokenizer(_spm_model(docs, pad_id=3))
    assert tok.mask_appended
    write_hf_tokenizer(tok, tmp_path)
    hf = _assert_same(tok, tmp_path, TEXTS)
    mask_text = TEXTS.index("a<mask>b <mask> <mask><mask>\n<mask>")
    assert tok.special.mask not in hf["ids"][mask_text]


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"add_dummy_prefix": True}, "add_dummy_prefix"),
        ({"model_type": "unigram"}, "model_type"),
        ({"byte_fallback": False}, "byte_fallback"),
        ({"normalization_rule_name": "nmt_nfkc"}, "normalization rule"),
        ({"remove_extra_whitespaces": True}, "remove_extra_whitespaces"),
    ],
)
def test_unsupported_models_are_refused(tmp_path, docs, options, reason):
    tok = Tokenizer(_spm_model(docs, **options))
    with pytest.raises(DataError, match=reason):
        write_hf_tokenizer(tok, tmp_path)
    assert not any(tmp_path.iterdir())


def test_read_sentencepiece_names_the_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer\.model does not exist"):
        read_sentencepiece(tmp_path)
