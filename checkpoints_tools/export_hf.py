"""`dlm export-hf`: a training checkpoint as a Hugging Face folder that loads with torch and
transformers alone (docs/algorithms.md §11).

The folder holds config.json (with `auto_map`, and the whole run config under
`dlm_run_config` so `dlm import-hf` can rebuild the run), the standalone
`configuration_dlm.py` / `modeling_dlm.py` (copied from `hf/`), the weights as safetensors
(sharded with an index above `max_shard_bytes`), the tokenizer and a model card. Everything is
read and checked first, written into a staging folder beside `out`, and renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from dlm_pretrain.checkpoints_tools.hf_layout import to_hf
from dlm_pretrain.checkpoints_tools.hf_tokenizer import write_hf_tokenizer
from dlm_pretrain.common.errors import CheckpointError, ConfigError, DataError
from dlm_pretrain.data_pipeline import Tokenizer
from dlm_pretrain.data_pipeline.manifest import (
    MANIFEST_FILE,
    TOKENIZER_FILE,
    Manifest,
    load_manifest,
)
from dlm_pretrain.parallel.config import TIME_FEATURES
from dlm_pretrain.parallel.model import LN_EPS
from dlm_pretrain.pretrain.checkpoint import checkpoint_folder
from dlm_pretrain.pretrain.checkpoint_files import read_meta, read_weights
from dlm_pretrain.pretrain.config import CONFIG_FILE, RunConfig, SamplingConfig, load_config
from dlm_pretrain.pretrain.model_spec import model_spec
from dlm_pretrain.pretrain.objectives import build_objective
from dlm_pretrain.pretrain.objectives.draws import T_MIN
from dlm_pretrain.pretrain.objectives.schedule import EPS
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from safetensors.torch import save_file
from torch import Tensor

HF_CODE = Path(__file__).parent / "hf"
CODE_FILES = ("configuration_dlm.py", "modeling_dlm.py", "sampling_dlm.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_SHARD_BYTES = 5 * 10**9
RUN_CONFIG_KEY = "dlm_run_config"  # config.json's copy of the run's configuration
# The training data's manifest, kept so the model card (and a re-export after `dlm import-hf`)
# can say what the model saw.
DATASET_MANIFEST = "dataset_manifest.json"
# objective -> (model class, the Auto class that loads it, conditioned on time: Duo on sigma_t,
# GIDD on t)
ARCHITECTURES = {
    "ar": ("DLMForCausalLM", "AutoModelForCausalLM", False),
    "mdlm": ("DLMForMaskedLM", "AutoModelForMaskedLM", False),
    "duo": ("DLMForMaskedLM", "AutoModelForMaskedLM", True),
    "gidd": ("DLMForMaskedLM", "AutoModelForMaskedLM", True),
    "esolm": ("DLMForMaskedLM", "AutoModelForMaskedLM", False),
}


def export_hf(
    run_dir: Path,
    out: Path,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """The run's latest checkpoint (or `step`'s) as a Hugging Face folder `out`, weights in
    `dtype`; nothing is written unless all of it is. Returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; choose one of {list(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not empty; give a new folder for the export")
    export = _Export(run_dir, step)
    state = {key: w.to(DTYPES[dtype]) for key, w in export.state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".incomplete-{out.name}-", dir=out.parent) as tmp:
        staging = Path(tmp) / out.name
        staging.mkdir()
        _write_json(staging / "config.json", export.hf_config(dtype))
        for name in CODE_FILES:
            shutil.copyfile(HF_CODE / name, staging / name)
        write_safetensors(state, staging, max_shard_bytes)
        write_hf_tokenizer(export.tokenizer, staging, model_max_length=export.manifest.seq_len)
        shutil.copyfile(run_dir / MANIFEST_FILE, staging / DATASET_MANIFEST)
        (staging / "README.md").write_text(export.model_card(staging.name))
        os.replace(staging, out)  # an empty `out` is replaced
    return out


class _Export:
    """What an export reads from a run directory, all checked before anything is written."""

    def __init__(self, run_dir: Path, step: int | None) -> None:
        self.folder = checkpoint_folder(run_dir, step)
        config = run_dir / CONFIG_FILE
        if not config.is_file():
            raise CheckpointError(f"{run_dir} has no {CONFIG_FILE}; it is not a run directory")
        self.cfg: RunConfig = load_config(str(config), [])
        if self.cfg.objective.name not in ARCHITECTURES:
            raise CheckpointError(
                f"objective {self.cfg.objective.name!r} cannot be exported yet; export supports "
                f"{list(ARCHITECTURES)}"
            )
        self.meta = read_meta(self.folder)
        self.manifest: Manifest = load_manifest(run_dir)
        self.tokenizer = Tokenizer.load(run_dir / TOKENIZER_FILE)
        if self.tokenizer.sha256 != self.manifest.tokenizer_sha256:
            raise DataError(
                f"{run_dir / TOKENIZER_FILE} is not the tokenizer of {run_dir}'s manifest; copy "
                "the dataset's tokenizer.model into the run directory"
            )
        self.model, self.vocab = model_spec(self.cfg, self.manifest, self.meta["vocab_size"])
        weights = read_weights(self.folder)  # checks every layer file
        self.state = to_hf(weights, self.model.n_heads, self.tokenizer.vocab_size)

    def hf_config(self, dtype: str) -> dict:
        """config.json: the fields of hf/configuration_dlm.py's DLMConfig, the Auto classes and
        our whole run configuration."""
        name = self.cfg.objective.name
        architecture, auto, time_conditioning = ARCHITECTURES[name]
        m, special, sampling = self.model, self.tokenizer.special, SamplingConfig()
        return {
            "architectures": [architecture],
            "auto_map": {
                "AutoConfig": "configuration_dlm.DLMConfig",
                auto: f"modeling_dlm.{architecture}",
            },
            "model_type": "dlm",
            "dtype": dtype,
            "vocab_size": self.tokenizer.vocab_size,
            "hidden_size": m.hidden_size,
            "n_layers": m.n_layers,
            "n_heads": m.n_heads,
            "cond_dim": m.cond_dim,
            "time_features": TIME_FEATURES,
            "seq_len": m.seq_len,
            "rotary_base": m.rotary_base,
            "layer_norm_eps": LN_EPS,
            "mask_token_id": special.mask,
            "bos_token_id": special.bos,
            "eos_token_id": special.eos,
            "pad_token_id": special.pad,
            "excluded_token_ids": _excluded(self.vocab, self.tokenizer.vocab_size),
            "objective": name,
            # the backbone's own pattern: Eso-LM is causal over its sorted slots ("sorted")
            "attention": build_objective(self.cfg.objective).attention_spec().kind,
            "time_conditioning": time_conditioning,
            "schedule_eps": EPS,
            "p_uniform": self.cfg.objective.p_uniform,
            "gamma": self.cfg.objective.gamma,
            "alpha_0": self.cfg.objective.alpha_0,
            "sampling_steps": sampling.steps,
            "sampling_top_p": sampling.top_p,
            "sampling_seed": sampling.seed,
            "sampling_t_min": T_MIN,
            "sampling_final_step": sampling.final_step,
            "sampling_top_p_on": sampling.top_p_on,
            "sampling_start_token": sampling.start_token,
            RUN_CONFIG_KEY: self.cfg.to_dict(),
            "dlm_checkpoint": {key: self.meta[key] for key in ("step", "layout", "vocab_size")},
        }

    def model_card(self, title: str) -> str:
        name = self.cfg.objective.name
        _, auto, _ = ARCHITECTURES[name]
        parameters = sum(w.numel() for w in self.state.values())
        loop, manifest = self.meta["loop"], self.manifest
        train = manifest.splits["train"]
        sources = ", ".join(map(str, manifest.corpus.get("source", []))) or "unrecorded"
        lines = [
            "---",
            "library_name: transformers",
            f"tags: [dlm-pretrain, diffusion-language-model, {name}]",
            "---",
            "",
            f"# {title}",
            "",
            f"A {_OBJECTIVE_NAMES[name]} language model trained with dlm-pretrain.",
            "",
            "| | |",
            "|---|---|",
            f"| objective | {name} |",
            f"| size preset | {self.cfg.model.size} (d={self.model.hidden_size}, "
            f"{self.model.n_layers} blocks, {self.model.n_heads} heads) |",
            f"| parameters | {parameters:,} |",
            f"| vocabulary | {self.tokenizer.vocab_size} ids, mask {self.tokenizer.special.mask} |",
            f"| context | {self.model.seq_len} tokens |",
            f"| dataset | {sources}: {train.documents:,} documents, {train.tokens:,} tokens, "
            f"{train.sequences:,} training sequences |",
            f"| training | step {self.meta['step']}, "
            f"{loop['consumed_samples'] * manifest.seq_len:,} tokens, {loop['flops']:.3g} FLOPs |",
            *_validation_rows(self.meta.get("validation"), name),
            "",
            "## Sampling",
            "",
            "```python",
            f"from transformers import AutoTokenizer, {auto}",
            "",
            "tokenizer = AutoTokenizer.from_pretrained(FOLDER, trust_remote_code=True)",
            f"model = {auto}.from_pretrained(FOLDER, trust_remote_code=True)",
            "print(tokenizer.batch_decode(model.sample(num_samples=2)))",
            "```",
            "",
            "The tokenizer needs no remote code; `trust_remote_code` only lets AutoTokenizer read "
            "config.json, which names the model's code.",
            "",
            "`model(input_ids, timesteps=t)` returns the logits [B, L, V]; `t` is the diffusion "
            "time in [0, 1] (Duo and GIDD are conditioned on it).",
            *_positions_note(name),
            "",
        ]
        return "\n".join(lines)


_OBJECTIVE_NAMES = {
    "ar": "autoregressive",
    "mdlm": "masked diffusion (MDLM)",
    "duo": "uniform-state diffusion (Duo)",
    "gidd": "masked-uniform interpolating diffusion (GIDD)",
    "esolm": "AR-masked interpolating diffusion (Eso-LM)",
}


def _positions_note(name: str) -> list[str]:
    if name != "esolm":
        return []
    return [
        "",
        "Eso-LM's denoiser is causal over an order of the tokens: "
        "`model(input_ids, positions=positions)` takes the tokens in that order with "
        "`positions` [B, L], each one's original position (training put the clean tokens "
        "first); without it the order is left to right.",
    ]


def _validation_rows(validation: dict | None, name: str) -> list[str]:
    if validation is None:
        return []
    bound = "" if name == "ar" else " (an upper bound: the ELBO)"
    return [
        f"| validation loss | {validation['loss']:.4f} nats/token at step {validation['step']} |",
        f"| validation perplexity | {math.exp(validation['loss']):.2f}{bound} |",
    ]


def _excluded(vocab: Vocab, vocab_size: int) -> list[int]:
    """The ids never predicted nor sampled, without the tensor-parallel padding (trimmed)."""
    return sorted(i for i in vocab.excluded if i < vocab_size)


def write_safetensors(state: dict[str, Tensor], folder: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or shards of at most `max_shard_bytes` (a larger tensor alone) with
    model.safetensors.index.json, as transformers names them."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(folder / "model.safetensors.index.json", index)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
