"""The key table between our whole-model state and the Hugging Face export (docs/algorithms.md
§11, docs/conventions.md §13), both ways.

Our keys are `checkpoint_files.read_weights`'s, "LAYER.name" (layer 0 the input stage, 1..n
the blocks, n + 1 the output stage); the export's are the reference's names under
`backbone.` (`hf/modeling_dlm.py`). Each key has one transform: none; the vocabulary rows,
trimmed to the tokenizer's V on export and padded with zero rows back to the padded V/tp
multiple on import; qkv rows, from our head-major [H, 3, d_head] to the reference's
[3, H, d_head] and back. megatron's `_extra_state` entries (None) are dropped on export and
restored on import, so `from_hf(to_hf(state))` is `state` with zero padding rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from dlm_pretrain.common.errors import CheckpointError
from torch import Tensor

PREFIX = "backbone."
EXTRA_STATE = "_extra_state"

# our name inside a layer -> (HF name inside its module, transform)
INPUT_KEYS = {
    "embedding.weight": ("vocab_embed.weight", "vocab"),
    "time_embedding.fc1.weight": ("sigma_map.mlp.0.weight", "same"),
    "time_embedding.fc1.bias": ("sigma_map.mlp.0.bias", "same"),
    "time_embedding.fc2.weight": ("sigma_map.mlp.2.weight", "same"),
    "time_embedding.fc2.bias": ("sigma_map.mlp.2.bias", "same"),
}
BLOCK_KEYS = {
    "norm1.weight": ("norm1.weight", "same"),
    "qkv.weight": ("attn_qkv.weight", "qkv"),
    "attn_out.weight": ("attn_out.weight", "same"),
    "norm2.weight": ("norm2.weight", "same"),
    "fc1.weight": ("mlp.0.weight", "same"),
    "fc1.bias": ("mlp.0.bias", "same"),
    "fc2.weight": ("mlp.2.weight", "same"),
    "fc2.bias": ("mlp.2.bias", "same"),
    "modulation.weight": ("adaLN_modulation.weight", "same"),
    "modulation.bias": ("adaLN_modulation.bias", "same"),
}
OUTPUT_KEYS = {
    "norm.weight": ("norm_final.weight", "same"),
    "modulation.weight": ("adaLN_modulation.weight", "same"),
    "modulation.bias": ("adaLN_modulation.bias", "same"),
    "head.weight": ("linear.weight", "vocab"),
    "head.bias": ("linear.bias", "vocab"),
}
# megatron's layers, which save an `_extra_state` entry beside their parameters
BLOCK_EXTRA_STATES = ("qkv", "attn_out", "fc1", "fc2")
OUTPUT_EXTRA_STATES = ("head",)


def key_table(n_blocks: int) -> list[tuple[str, str, str]]:
    """(our key, HF key, transform) for every parameter of a model with `n_blocks` blocks."""
    table = [(f"0.{ours}", f"{PREFIX}{hf}", kind) for ours, (hf, kind) in INPUT_KEYS.items()]
    for block in range(n_blocks):
        table += [
            (f"{block + 1}.{ours}", f"{PREFIX}blocks.{block}.{hf}", kind)
            for ours, (hf, kind) in BLOCK_KEYS.items()
        ]
    last = n_blocks + 1
    table += [
        (f"{last}.{ours}", f"{PREFIX}output_layer.{hf}", kind)
        for ours, (hf, kind) in OUTPUT_KEYS.items()
    ]
    return table


def to_hf(state: dict[str, Tensor | None], n_heads: int, vocab_size: int) -> dict[str, Tensor]:
    """Our whole model (read_weights) -> the export's state dict; vocabulary rows trimmed to
    `vocab_size`, the tokenizer's V. Tensors keep their dtype."""
    params = {k: v for k, v in state.items() if not k.endswith(EXTRA_STATE)}
    n_blocks = _count(params, lambda k: int(k.split(".", 1)[0])) - 2
    table = key_table(n_blocks)
    _check_keys(params, [ours for ours, _, _ in table], "checkpoint")
    transforms = {"same": _same, "vocab": lambda w: w[:vocab_size], "qkv": _qkv_to_hf(n_heads)}
    return {hf: transforms[kind](params[ours]).contiguous() for ours, hf, kind in table}


def from_hf(
    hf_state: dict[str, Tensor], n_heads: int, padded_vocab: int
) -> dict[str, Tensor | None]:
    """The export's state dict -> our whole model, float32, vocabulary rows padded with zeros
    to `padded_vocab`, megatron's `_extra_state` entries restored (None)."""
    n_blocks = _count(hf_state, _block_index)
    table = key_table(n_blocks)
    _check_keys(hf_state, [hf for _, hf, _ in table], "Hugging Face state")
    transforms = {"same": _same, "vocab": _pad_rows(padded_vocab), "qkv": _qkv_from_hf(n_heads)}
    state = {ours: transforms[kind](hf_state[hf]).float() for ours, hf, kind in table}
    extra = [f"{block + 1}.{name}" for block in range(n_blocks) for name in BLOCK_EXTRA_STATES]
    extra += [f"{n_blocks + 1}.{name}" for name in OUTPUT_EXTRA_STATES]
    return state | {f"{name}.{EXTRA_STATE}": None for name in extra}


def _same(w: Tensor) -> Tensor:
    return w


def _qkv_to_hf(n_heads: int) -> Callable[[Tensor], Tensor]:
    """[H, 3, d_head] rows -> [3, H, d_head] rows. [3d, d] -> [3d, d]"""
    return lambda w: w.view(n_heads, 3, -1, w.shape[1]).transpose(0, 1).reshape(w.shape)


def _qkv_from_hf(n_heads: int) -> Callable[[Tensor], Tensor]:
    """[3, H, d_head] rows -> [H, 3, d_head] rows. [3d, d] -> [3d, d]"""
    return lambda w: w.view(3, n_heads, -1, w.shape[1]).transpose(0, 1).reshape(w.shape)


def _pad_rows(padded_vocab: int) -> Callable[[Tensor], Tensor]:
    """[V, ...] -> [padded_vocab, ...], the padding rows zero."""

    def pad(w: Tensor) -> Tensor:
        if w.shape[0] > padded_vocab:
            raise CheckpointError(
                f"the export has {w.shape[0]} vocabulary rows, more than the {padded_vocab} "
                "of the model to import into; give a padded vocabulary at least that large"
            )
        return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], *w.shape[1:])])

    return pad


def _block_index(key: str) -> int:
    """backbone.blocks.I.* -> I; -1 for the other keys."""
    parts = key.split(".")
    return int(parts[2]) if parts[1] == "blocks" else -1


def _count(state: dict, index: Callable[[str], int]) -> int:
    return max(index(key) for key in state) + 1


def _check_keys(state: dict, expected: list[str], what: str) -> None:
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"the {what} does not hold a DiT of the expected shape: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; was it written by "
            "another version of dlm?"
        )
