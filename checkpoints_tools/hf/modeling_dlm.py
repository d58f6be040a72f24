"""A diffusion (MDLM, Duo, GIDD, Eso-LM) or autoregressive language model trained with
dlm-pretrain, loaded with `AutoModelForMaskedLM` / `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`, and its samplers.

Standalone: this file imports only torch, transformers and its two neighbours (the
configuration and the samplers), so an exported folder needs neither dlm-pretrain, DeepSpeed
nor megatron. It is the training
backbone (dlm-pretrain docs/algorithms.md §5) written for one process, with the reference's
parameter names and qkv rows in the reference's [3, H, d_head] order:

    cond = SiLU(MLP(cos, sin features of s))             s: sigma_t (Duo), t (GIDD) or 0
    per block (adaLN-Zero): x += gate1 * Attn(RoPE, LN1(x) (1 + scale1) + shift1)
                            x += gate2 * MLP_gelu_tanh(LN2(x) (1 + scale2) + shift2)
    logits = Linear(LN(x) (1 + scale) + shift)

LayerNorms and the residual stream run in float32, the matmuls in the weights' dtype.
Attention is bidirectional, causal (AR) or sorted (Eso-LM, §5.6): the tokens come in a
per-sequence order, each rotated at its original position, each seeing itself and those before.

The samplers (sampling_dlm.py) repeat dlm-pretrain's draw for draw, so the same seed gives
the same tokens as `dlm sample` (a test in dlm-pretrain holds them equal).
Shapes: B batch, L length, d hidden size, H heads, V vocabulary (mask included).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, MaskedLMOutput

from .configuration_dlm import DLMConfig
from .sampling_dlm import SAMPLERS, categorical, check_options, nucleus, start_id


class LayerNorm(nn.Module):
    """Weight-only LayerNorm in float32. [..., d] -> [..., d] f32"""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.weight.shape, self.weight.float(), None, self.eps)


class TimestepEmbedder(nn.Module):
    """s [B] -> SiLU(MLP([cos(s f_k), sin(s f_k)])) [B, c], f_k = 10^(-4k/half)."""

    def __init__(self, config: DLMConfig) -> None:
        super().__init__()
        self.half = config.time_features // 2
        self.mlp = nn.Sequential(
            nn.Linear(config.time_features, config.cond_dim),
            nn.SiLU(),
            nn.Linear(config.cond_dim, config.cond_dim),
        )

    def forward(self, s: Tensor) -> Tensor:
        steps = torch.arange(self.half, dtype=torch.float32, device=s.device)
        freqs = torch.exp(-math.log(10_000.0) * steps / self.half)
        angles = s.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return F.silu(self.mlp(features.to(self.mlp[0].weight.dtype)))


def _rotary(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, l, d_head] f32 at positions [B, l] int64 (broadcast over the heads),
    rotate-half (GPT-NeoX) pairing."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = 1.0 / base ** (exponents / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos(), angles.sin()


def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, L, d_head] -> same, in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class KVCache:
    """Keys and values of one block's committed tokens for incremental causal decoding.
    [B, H, length, d_head]"""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: Tensor, v: Tensor, keep: int | None = None) -> tuple[Tensor, Tensor]:
        """The cached keys and values followed by the new ones. Only the first `keep` new ones
        (all by default) stay cached: an Eso-LM window ends in masks, whose keys must not
        outlive the call."""
        k = k if self.k is None else torch.cat([self.k, k], dim=2)
        v = v if self.v is None else torch.cat([self.v, v], dim=2)
        committed = k.shape[2] if keep is None else self.length + keep
        self.k, self.v = k[:, :, :committed], v[:, :, :committed]
        return k, v


class DDiTBlock(nn.Module):
    """Pre-LN block with adaLN-Zero modulation. x [B, l, d] f32, cond [B, c] -> [B, l, d] f32"""

    def __init__(self, config: DLMConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.n_heads, self.head_dim = config.n_heads, d // config.n_heads
        self.rotary_base = config.rotary_base
        self.causal = config.attention != "bidirectional"  # sorted: causal over the slots
        self.norm1 = LayerNorm(d, config.layer_norm_eps)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)  # rows [3, H, d_head]
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d, config.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d)
        )
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * d)

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        positions: Tensor,
        cache: KVCache | None = None,
        keep: int | None = None,
    ) -> Tensor:
        modulation = self.adaLN_modulation(cond)[:, None].float()
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)
        h = _modulate(self.norm1(x), shift1, scale1)
        attention = self._attention(h, positions, cache, keep)
        x = x + gate1 * attention.float()
        h = _modulate(self.norm2(x), shift2, scale2).to(self.mlp[0].weight.dtype)
        return x + gate2 * self.mlp(h).float()

    def _attention(
        self, h: Tensor, positions: Tensor, cache: KVCache | None, keep: int | None
    ) -> Tensor:
        """h [B, l, d] f32 at positions [B, l] int64 -> [B, l, d]; `keep` as in
        KVCache.append."""
        batch, seq, d = h.shape
        qkv = self.attn_qkv(h.to(self.attn_qkv.weight.dtype))
        qkv = qkv.view(batch, seq, 3, self.n_heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, l, d_head]
        cos, sin = _rotary(positions, self.head_dim, self.rotary_base)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        mask = None
        if cache is not None:
            start = cache.length
            k, v = cache.append(k, v, keep)
            # the l queries see every cached key and, causally, the new ones
            mask = torch.ones(seq, start + seq, dtype=torch.bool, device=h.device).tril(start)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and cache is None
        )
        return self.attn_out(a.transpose(1, 2).reshape(batch, seq, d))


class DDitFinalLayer(nn.Module):
    """x [B, L, d] f32, cond [B, c] -> logits [B, L, V] in the weights' dtype"""

    def __init__(self, config: DLMConfig) -> None:
        super().__init__()
        self.norm_final = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.linear = nn.Linear(config.hidden_size, config.vocab_size)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.hidden_size)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(cond)[:, None].float().chunk(2, dim=-1)
        h = _modulate(self.norm_final(x), shift, scale)
        return self.linear(h.to(self.linear.weight.dtype))


class DLMBackbone(nn.Module):
    """tokens [B, l] int64, s [B] -> logits [B, l, V]. The tokens sit at `positions` [B, l]
    int64 (sorted attention: causal over the given order), or after the cached ones (0.. without
    caches). With `caches` (causal and sorted models) they see every cached token, and only the
    first `keep` (all by default) are cached."""

    def __init__(self, config: DLMConfig) -> None:
        super().__init__()
        self.vocab_embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.sigma_map = TimestepEmbedder(config)
        self.blocks = nn.ModuleList(DDiTBlock(config) for _ in range(config.n_layers))
        self.output_layer = DDitFinalLayer(config)

    def forward(
        self,
        tokens: Tensor,
        s: Tensor,
        positions: Tensor | None = None,
        caches: list[KVCache] | None = None,
        keep: int | None = None,
    ) -> Tensor:
        if positions is None:
            start = 0 if caches is None else caches[0].length
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
            positions = positions.expand_as(tokens)
        x = self.vocab_embed(tokens).float()
        cond = self.sigma_map(s)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, positions, None if caches is None else caches[i], keep)
        return self.output_layer(x, cond)

    def caches(self) -> list[KVCache]:
        """Empty caches, one per block, for incremental decoding."""
        return [KVCache() for _ in self.blocks]


class DLMPreTrainedModel(PreTrainedModel):
    config_class = DLMConfig
    base_model_prefix = "backbone"
    _no_split_modules = ("DDiTBlock",)

    def __init__(self, config: DLMConfig) -> None:
        super().__init__(config)
        self.backbone = DLMBackbone(config)
        self.post_init()

    def _logits(
        self,
        input_ids: Tensor,
        timesteps: Tensor | None,
        attention_mask,
        positions: Tensor | None = None,
    ) -> Tensor:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported: the model was trained unpadded")
        t = torch.zeros(input_ids.shape[0], device=input_ids.device)
        if timesteps is not None:
            t = torch.as_tensor(timesteps, dtype=torch.float32, device=input_ids.device)
            t = t.expand(input_ids.shape[0])
        return self.backbone(input_ids, self._time_input(t), positions)

    def _time_input(self, t: Tensor) -> Tensor:
        """The scalar the conditioning sees: sigma_t for Duo, t for GIDD, 0 otherwise.
        t [B] f32"""
        if not self.config.time_conditioning:
            return torch.zeros_like(t)
        if self.config.objective == "gidd":
            return t
        return -torch.log(1 - (1 - self.config.schedule_eps) * t)

    def _real(self) -> Tensor:
        """[V] bool: the ids that may be predicted and sampled (all but the excluded)."""
        real = torch.ones(self.config.vocab_size, dtype=torch.bool, device=self.device)
        real[self.config.excluded_token_ids] = False
        return real

    def _denoiser(self, logits: Tensor, top_p: float) -> Tensor:
        """x̂: softmax over the real ids in float64, nucleus-filtered. [N, l, V] -> f64"""
        logits = logits.double().masked_fill(~self._real(), float("-inf"))
        return nucleus(torch.softmax(logits, dim=-1), top_p)

    def _defaults(self, steps, top_p, seed, seq_len) -> tuple[int, float, int, int]:
        c = self.config
        return (
            c.sampling_steps if steps is None else steps,
            c.sampling_top_p if top_p is None else top_p,
            c.sampling_seed if seed is None else seed,
            c.seq_len if seq_len is None else seq_len,
        )

    def _options(self, final_step, top_p_on) -> tuple[str, str]:
        """final_step and top_p_on (sampling_dlm.py), the config's where not given."""
        c = self.config
        final_step = c.sampling_final_step if final_step is None else final_step
        top_p_on = c.sampling_top_p_on if top_p_on is None else top_p_on
        check_options(final_step, top_p_on)
        return final_step, top_p_on


class DLMForMaskedLM(DLMPreTrainedModel):
    """MDLM, Duo and GIDD: bidirectional denoisers of all L positions at once; Eso-LM: a
    denoiser causal over a per-sequence order of the positions."""

    def forward(
        self,
        input_ids: Tensor,
        timesteps: Tensor | float | None = None,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> MaskedLMOutput:
        """input_ids [B, L] int64; timesteps: the diffusion time t in [0, 1] per sequence
        ([B] or a scalar; Duo sees sigma_t, GIDD t, MDLM and Eso-LM ignore it; default 0);
        positions [B, L] int64: Eso-LM's order, each slot's original position (slot j is
        rotated at positions[:, j] and sees slots <= j; training put the clean tokens first;
        default 0..L-1) -> logits [B, L, V]"""
        logits = self._logits(input_ids, timesteps, attention_mask, positions)
        return MaskedLMOutput(logits=logits)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int = 1,
        steps: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        seq_len: int | None = None,
        final_step: str | None = None,
        top_p_on: str | None = None,
    ) -> Tensor:
        """Ancestral sampling from the prior (the config's defaults for what is not given;
        final_step and top_p_on as in sampling_dlm.py). -> [num_samples, seq_len] int64"""
        steps, top_p, seed, seq_len = self._defaults(steps, top_p, seed, seq_len)
        options = self._options(final_step, top_p_on)
        generator = torch.Generator().manual_seed(seed)
        sampler = SAMPLERS[self.config.objective]
        return sampler(self, num_samples, seq_len, steps, top_p, generator, *options)


class DLMForCausalLM(DLMPreTrainedModel):
    """AR: position l predicts token l + 1."""

    def forward(
        self,
        input_ids: Tensor,
        timesteps: Tensor | float | None = None,
        attention_mask: Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, L] int64 -> logits [B, L, V] (timesteps: accepted, ignored: s = 0)"""
        return CausalLMOutputWithPast(logits=self._logits(input_ids, timesteps, attention_mask))

    @torch.no_grad()
    def sample(
        self,
        num_samples: int = 1,
        top_p: float | None = None,
        seed: int | None = None,
        seq_len: int | None = None,
        start_token: str | None = None,
    ) -> Tensor:
        """Left to right from BOS ("bos", as the paper's code; EOS without a BOS) or EOS
        ("eos", the token before every training document), one forward per token with keys
        and values cached; top_p filters x̂ (AR has no final_step, and top_p_on changes
        nothing). -> [num_samples, seq_len] int64, the start token first"""
        _, top_p, seed, seq_len = self._defaults(None, top_p, seed, seq_len)
        start = self.config.sampling_start_token if start_token is None else start_token
        generator = torch.Generator().manual_seed(seed)
        caches = self.backbone.caches()
        first = start_id(self.config, start)
        tokens = torch.full((num_samples, 1), first, dtype=torch.int64, device=self.device)
        s = torch.zeros(num_samples, device=self.device)
        for _ in range(seq_len - 1):
            p = self._denoiser(self.backbone(tokens[:, -1:], s, caches=caches)[:, -1], top_p)
            tokens = torch.cat([tokens, categorical(p, generator).unsqueeze(1)], dim=1)
        return tokens
