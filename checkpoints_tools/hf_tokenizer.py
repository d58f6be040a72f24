"""Our sentencepiece tokenizer as Hugging Face tokenizer files (docs/algorithms.md §11).

A released model must tokenize exactly as in training, loaded with
`AutoTokenizer.from_pretrained(dir)` alone: no sentencepiece, no remote code. We support the
kind `train_tokenizer` makes (byte-fallback BPE, identity normalisation, no dummy prefix) and
refuse, naming the option, every model we cannot reproduce exactly. The conversion is checked
against sentencepiece before anything is written.

sentencepiece's BPE (bpe_model.cc) splits the normalised text into characters, user-defined
pieces taken whole and never merged, then repeatedly merges the adjacent pair whose joined
string is a piece with the highest score, the leftmost on ties; characters outside the
vocabulary become byte pieces. `tokenizers`' BPE merges the pair of lowest rank, the leftmost
on ties, so the ranks follow the scores (`_merges`); user-defined pieces become added tokens,
which split the text before the model just as sentencepiece's prefix matcher does.

One difference is left, by transformers' design: it reads every named special token in text
or none (`split_special_tokens`). A trained `<mask>` is a user-defined piece, read in text by
both, so transformers also reads a literal "<s>", "</s>", "<pad>" or "<unk>" as that id where
sentencepiece sees characters; tokens our encoder never emits. An appended mask is no piece:
there no special token is read in text, as in sentencepiece.
"""

from __future__ import annotations

import json
from pathlib import Path

from dlm_pretrain.common.errors import DataError
from dlm_pretrain.common.files import write_atomic
from dlm_pretrain.data_pipeline import Tokenizer
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, decoders, normalizers
from tokenizers import Tokenizer as HfTokenizer
from tokenizers.models import BPE

Piece = sp_pb2.ModelProto.SentencePiece
SPACE = "▁"  # sentencepiece's escaped space, U+2581
MASK_PIECE = "<mask>"  # the appended mask's text, as `Tokenizer.decode` writes it
SP_FILE = "tokenizer.model"
# Whitespace runs, the pieces `allow_whitespace_only_pieces` makes, probe merge order in the check.
_WHITESPACE_PROBES = tuple(c * n for c in (" ", "\t", "\n", " \t") for n in range(1, 33))


def write_hf_tokenizer(
    tokenizer: Tokenizer, out_dir: Path, model_max_length: int | None = None
) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and the original
    sentencepiece bytes (tokenizer.model) to `out_dir`; refuse a model we cannot reproduce."""
    hf = build_hf_tokenizer(tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    special = _special_tokens(tokenizer, hf)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": tokenizer.mask_appended,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    write_atomic(out_dir / "tokenizer.json", hf.to_str(pretty=True).encode())
    write_atomic(out_dir / "tokenizer_config.json", _json(config))
    write_atomic(out_dir / "special_tokens_map.json", _json(special))
    write_atomic(out_dir / SP_FILE, tokenizer.model_bytes)


def read_sentencepiece(directory: Path) -> bytes:
    """The sentencepiece model bytes saved beside the Hugging Face files (`dlm import-hf`)."""
    path = directory / SP_FILE
    if not path.is_file():
        raise DataError(f"{path} does not exist; export the tokenizer with write_hf_tokenizer")
    return path.read_bytes()


def build_hf_tokenizer(tokenizer: Tokenizer) -> HfTokenizer:
    """The `tokenizers` equivalent of `tokenizer`, checked against it on every piece's text."""
    proto = sp_pb2.ModelProto.FromString(tokenizer.model_bytes)
    _check_supported(proto)
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    if tokenizer.mask_appended:
        vocab[MASK_PIECE] = tokenizer.special.mask
    hf = HfTokenizer(
        BPE(
            vocab=vocab,
            merges=_merges(pieces),
            unk_token=pieces[proto.trainer_spec.unk_id].piece,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    hf.normalizer = normalizers.Replace(" ", SPACE)
    hf.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    hf.add_tokens(_added_tokens(pieces, special=False))
    hf.add_special_tokens(_added_tokens(pieces, special=True) + _appended_mask(tokenizer))
    hf.encode_special_tokens = tokenizer.mask_appended
    _check_equal(tokenizer, hf, pieces)
    return hf


def _check_supported(proto: sp_pb2.ModelProto) -> None:
    """Refuse options whose behaviour the conversion does not reproduce exactly."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    refusals = {
        "model_type is not BPE": trainer.model_type != sp_pb2.TrainerSpec.BPE,
        "byte_fallback is off (unknown text would decode as ' ⁇ ')": not trainer.byte_fallback,
        "add_dummy_prefix is on (Llama style)": norm.add_dummy_prefix,
        "remove_extra_whitespaces is on": norm.remove_extra_whitespaces,
        "escape_whitespaces is off": not norm.escape_whitespaces,
        f"normalization rule {norm.name!r} is not identity": bool(norm.precompiled_charsmap),
        "denormalization rules are set": bool(proto.denormalizer_spec.precompiled_charsmap),
        "treat_whitespace_as_suffix is on": trainer.treat_whitespace_as_suffix,
        "it has UNUSED pieces (re-split after merging)": any(
            p.type == Piece.UNUSED for p in proto.pieces
        ),
    }
    reasons = [reason for reason, refused in refusals.items() if refused]
    if reasons:
        raise DataError(
            "cannot export this sentencepiece model as a Hugging Face tokenizer that encodes "
            f"exactly like it: {'; '.join(reasons)}. Export a model made by train_tokenizer "
            "(byte-fallback BPE, identity normalisation, no dummy prefix)"
        )


def _merges(pieces: list[Piece]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, highest score of the merged piece
    first (sentencepiece's merge order). A piece with several splits ranks first the one whose
    parts form earliest, the split its own text reaches; `_check_equal` confirms the order."""
    score = {p.piece: p.score for p in pieces if p.type == Piece.NORMAL}
    ranked = []
    for pid, p in enumerate(pieces):
        if p.type != Piece.NORMAL:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in score and right in score:
                order = (-p.score, pid, -min(score[left], score[right]), -score[left])
                ranked.append((order, (left, right)))
    return [pair for _, pair in sorted(ranked)]


def _added_tokens(pieces: list[Piece], special: bool) -> list[AddedToken]:
    """User-defined pieces (read in text, never merged; `normalized`: matched after spaces
    become ▁, as sentencepiece matches them) or, with `special`, the control and unknown pieces."""
    kinds = (Piece.CONTROL, Piece.UNKNOWN) if special else (Piece.USER_DEFINED,)
    return [
        AddedToken(p.piece, special=special, normalized=not special)
        for p in pieces
        if p.type in kinds
    ]


def _appended_mask(tokenizer: Tokenizer) -> list[AddedToken]:
    """The appended mask id, decoded as `Tokenizer.decode` writes it."""
    return [AddedToken(MASK_PIECE, special=True)] if tokenizer.mask_appended else []


def _check_equal(tokenizer: Tokenizer, hf: HfTokenizer, pieces: list[Piece]) -> None:
    """Encode every piece's text and whitespace runs both ways; any difference refuses."""
    texts = [p.piece.replace(SPACE, " ") for p in pieces if p.type == Piece.NORMAL]
    texts += [t + t for t in texts] + list(_WHITESPACE_PROBES)
    expected = tokenizer.encode(texts)
    got = hf.encode_batch(texts, add_special_tokens=False)
    for text, want, have in zip(texts, expected, got, strict=True):
        if list(want) != have.ids:
            raise DataError(
                f"the Hugging Face conversion encodes {text!r} as {have.ids}, sentencepiece as "
                f"{list(want)}; this model's merges cannot be expressed as ranked BPE merges"
            )


def _special_tokens(tokenizer: Tokenizer, hf: HfTokenizer) -> dict[str, str]:
    """Token strings of the named special ids, for transformers' configuration."""
    s = tokenizer.special
    ids = {"bos_token": s.bos, "eos_token": s.eos, "unk_token": s.unk, "pad_token": s.pad}
    ids["mask_token"] = s.mask
    return {key: hf.id_to_token(i) for key, i in ids.items() if i is not None and i >= 0}


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
