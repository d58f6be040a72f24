"""The sentencepiece tokenizer, with the mask token diffusion models need (docs/algorithms.md §1).

A trained tokenizer carries `<mask>` as a piece. An existing model without one gets the mask
appended as id `sp.vocab_size()`, so V = len(pieces) + 1, as the reference does for Llama.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from dlm_pretrain.common.errors import DataError

MASK_PIECES = ("<mask>", "[MASK]", "<|mask|>")
# sentencepiece's result depends on its thread count: fixed, so --workers never changes the model.
TRAIN_THREADS = 4


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens; `pad` is None when the model has no padding piece."""

    bos: int
    eos: int
    unk: int
    pad: int | None
    mask: int


class Tokenizer:
    """A sentencepiece model plus the mask id; `vocab_size` is V, mask included."""

    def __init__(self, model_bytes: bytes) -> None:
        self.model_bytes = model_bytes
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        pieces = self.sp.vocab_size()
        mask = next((self.sp.piece_to_id(p) for p in MASK_PIECES if self._has_piece(p)), None)
        self.mask_appended = mask is None
        self.vocab_size = pieces + 1 if self.mask_appended else pieces
        pad = self.sp.pad_id()
        self.special = SpecialIds(
            bos=self.sp.bos_id(),
            eos=self.sp.eos_id(),
            unk=self.sp.unk_id(),
            pad=pad if pad >= 0 else None,
            mask=pieces if mask is None else mask,
        )
        if self.special.eos < 0:
            raise DataError("the tokenizer has no EOS piece; packing joins documents with EOS")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer {path} does not exist; pass a sentencepiece .model file")
        try:
            return cls(path.read_bytes())
        except RuntimeError as e:
            raise DataError(f"{path} is not a sentencepiece model ({e})") from e

    def _has_piece(self, piece: str) -> bool:
        pid = self.sp.piece_to_id(piece)
        return pid != self.sp.unk_id() and self.sp.id_to_piece(pid) == piece

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text, without BOS/EOS. [n texts] -> n x [tokens] int32

        One thread: parallelism comes from worker processes (sentencepiece would otherwise
        start a thread per core in every worker and oversubscribe the machine).
        """
        ids = self.sp.encode(list(texts), num_threads=1)
        return [np.asarray(x, dtype=np.int32) for x in ids]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; the mask, when appended, and other specials decode as pieces."""
        ids = [int(i) for i in ids]
        pieces = self.sp.vocab_size()
        out, run = [], []
        for i in ids:
            if i < pieces and not self.sp.is_control(i):
                run.append(i)
                continue
            out.append(self.sp.decode(run))
            run = []
            out.append("<mask>" if i == self.special.mask else self.sp.id_to_piece(i))
        out.append(self.sp.decode(run))
        return "".join(out)

    def describe(self) -> dict:
        """The manifest entry for this tokenizer."""
        return {
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "pieces": self.sp.vocab_size(),
            "mask_appended": self.mask_appended,
            "special_ids": asdict(self.special),
        }


def train_tokenizer(lines: Iterator[str], vocab_size: int) -> Tokenizer:
    """Train a byte-fallback BPE model that reproduces any text exactly (decode(encode(x)) == x).

    Identity normalisation and no dummy prefix keep code and whitespace intact; newline and
    `<mask>` are pieces of their own. The seed is fixed so that re-runs give the same model.
    """
    model = io.BytesIO()
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["<mask>", "\n"],
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            max_sentence_length=16384,
            num_threads=TRAIN_THREADS,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(_training_failure(vocab_size, str(e))) from e
    return Tokenizer(model.getvalue())


def _training_failure(vocab_size: int, error: str) -> str:
    """What to change: every distinct character needs a piece (character_coverage=1.0 keeps
    code exact), so a corpus with more of them than vocab_size needs a larger vocabulary; any
    other failure is a corpus too small for the vocabulary."""
    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", error)
    if needed:
        return (
            f"a {vocab_size}-piece tokenizer cannot hold this corpus: its distinct characters "
            f"and the special pieces need {needed[1]}; raise vocab_size to at least {needed[1]}"
        )
    return (
        f"training a {vocab_size}-piece tokenizer failed ({error}); the corpus is probably too "
        "small for that vocabulary: lower vocab_size or add text"
    )
