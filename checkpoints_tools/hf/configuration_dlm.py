"""Configuration of a diffusion (MDLM, Duo, GIDD, Eso-LM) or autoregressive language model
trained with dlm-pretrain, loaded with
`AutoConfig.from_pretrained(folder, trust_remote_code=True)`.

Standalone: this file imports only transformers, so an exported folder needs neither
dlm-pretrain, DeepSpeed nor megatron. Every shape, the special ids, the objective with its
noise schedule and the sampler defaults live here; `modeling_dlm.py` reads nothing else.
"""

from __future__ import annotations

from transformers import PretrainedConfig

OBJECTIVES = ("ar", "mdlm", "duo", "gidd", "esolm")
# The attention each objective was trained with, "bidirectional" for the others: AR is causal
# over the positions, Eso-LM causal over a per-sequence order of them ("sorted").
ATTENTION = {"ar": "causal", "esolm": "sorted"}


class DLMConfig(PretrainedConfig):
    """The DiT backbone (adaLN time conditioning, rotary positions, untied embeddings) and the
    objective it was trained with."""

    model_type = "dlm"

    # shapes; vocab_size counts every tokenizer id, the mask included
    vocab_size: int = 32001
    hidden_size: int = 768
    n_layers: int = 12
    n_heads: int = 12
    cond_dim: int = 128  # width of the time conditioning
    time_features: int = 256  # sinusoidal features of the time input (cos and sin halves)
    seq_len: int = 1024  # training sequence length
    rotary_base: float = 10_000.0
    layer_norm_eps: float = 1e-5
    # special ids; excluded ids (the mask, the pad) are never predicted or sampled
    mask_token_id: int = 32000
    bos_token_id: int | None = None  # AR's first token by default (if >= 0), as the paper's
    eos_token_id: int | None = None  # precedes every document; AR's start with start_token eos
    pad_token_id: int | None = None
    excluded_token_ids: list[int] | None = None
    # objective: its attention as in ATTENTION; Duo conditions on sigma_t = -log(alpha_t) with
    # alpha_t = 1 - (1 - schedule_eps) t, GIDD on t, the others on 0; GIDD's mixing schedule
    # has the uniform share p_uniform and the exponent gamma
    objective: str = "mdlm"
    attention: str = "bidirectional"
    time_conditioning: bool = False
    schedule_eps: float = 1e-3
    p_uniform: float = 0.0
    gamma: float = 1.0
    # Eso-LM: the clean share where diffusion ends; its sampler decodes the rest in order
    alpha_0: float = 1.0
    # sampler defaults: the reverse process runs from t = 1 to sampling_t_min; final_step,
    # top_p_on and AR's start_token as in sampling_dlm.py
    sampling_steps: int = 128
    sampling_top_p: float = 1.0
    sampling_seed: int = 0
    sampling_t_min: float = 1e-5
    sampling_final_step: str = "default"
    sampling_top_p_on: str = "reference"
    sampling_start_token: str = "bos"

    def __post_init__(self, **kwargs) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {OBJECTIVES}")
        attention = ATTENTION.get(self.objective, "bidirectional")
        if self.attention != attention:
            raise ValueError(f"objective {self.objective!r} needs {attention} attention")
        if self.excluded_token_ids is None:
            self.excluded_token_ids = [self.mask_token_id]
        super().__post_init__(**kwargs)
