"""The DDiT backbone at tp = pp = 1: size presets, initial state, attention pattern."""

from __future__ import annotations

import pytest
import torch
from dlm_pretrain.parallel.config import (
    SIZES,
    TENSOR_SPLIT_DIMS,
    AttentionSpec,
    ModelConfig,
    ParallelConfig,
    parameter_count,
)
from dlm_pretrain.parallel.groups import Runtime, init_process_groups
from dlm_pretrain.parallel.model import build_pipeline

# json "params" of the reference's configs/flops (docs/algorithms.md §5.7, in millions, V = 32001)
REFERENCE_PARAMS_M = {
    "6M": 22.45,
    "19M": 41.31,
    "113M": 141.57,
    "302M": 306.77,
    "944M": 836.57,
    "2121M": 1778.50,
}


@pytest.fixture(scope="module")
def groups():
    return init_process_groups(ParallelConfig(), Runtime.detect())


def _model(groups, size="tiny", kind="bidirectional", vocab=97, seq_len=32, **kw):
    cfg = ModelConfig.preset(size, vocab_size=vocab, seq_len=seq_len, **kw)
    return cfg, build_pipeline(cfg, groups, AttentionSpec(kind))


@pytest.mark.parametrize("size", ["tiny", "cpu-small", "6M", "19M"])
def test_built_model_has_exactly_the_formula_parameter_count(groups, size):
    cfg, model = _model(groups, size, vocab=32001)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(cfg)


@pytest.mark.parametrize(("size", "millions"), REFERENCE_PARAMS_M.items())
def test_formula_matches_the_reference_table(size, millions):
    """The table's figures were printed by calflops with a few significant digits (1e-4)."""
    cfg = ModelConfig.preset(size, vocab_size=32001, seq_len=2048)
    assert parameter_count(cfg) / 1e6 == pytest.approx(millions, rel=1e-4)


def test_every_preset_is_valid():
    for size, (d, layers, heads) in SIZES.items():
        cfg = ModelConfig.preset(size, vocab_size=1000, seq_len=128)
        assert (cfg.hidden_size, cfg.n_layers, cfg.n_heads) == (d, layers, heads)


def test_initial_model_predicts_uniform_and_blocks_are_identity(groups):
    cfg, model = _model(groups)
    tokens = torch.randint(cfg.vocab_size, (3, cfg.seq_len))
    s = torch.rand(3)
    logits = model((tokens, s)).logits()
    assert logits.shape == (3, cfg.seq_len, cfg.vocab_size)
    assert torch.all(logits == 0), "zero-initialised head gives uniform predictions"
    hidden, cond = model.forward_funcs[0]((tokens, s))
    after_blocks = hidden, cond
    for block in model.forward_funcs[1:-1]:
        after_blocks = block(after_blocks)
    assert torch.equal(after_blocks[0], hidden), "adaLN-Zero blocks start as the identity"


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)  # leave zero-init, stay unsaturated


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_attention_pattern(groups, kind):
    cfg, model = _model(groups, kind=kind)
    _randomise(model, 1)
    tokens = torch.randint(cfg.vocab_size, (2, cfg.seq_len))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % cfg.vocab_size
    s = torch.rand(2)
    diff = (model((tokens, s)).logits() - model((changed, s)).logits()).abs().amax(dim=(0, 2))
    assert diff[20] > 0 and diff[21:].max() > 0
    if kind == "causal":
        assert torch.all(diff[:20] == 0), "a causal model saw a later token"
    else:
        assert torch.all(diff[:20] > 0), "a bidirectional model ignored a later token"


def test_time_conditioning_changes_the_output(groups):
    cfg, model = _model(groups)
    _randomise(model, 2)
    tokens = torch.randint(cfg.vocab_size, (2, cfg.seq_len))
    assert not torch.allclose(
        model((tokens, torch.zeros(2))).logits(), model((tokens, torch.ones(2))).logits()
    )


def test_initialisation_is_a_function_of_the_seed(groups):
    _, a = _model(groups, init_seed=5)
    _, b = _model(groups, init_seed=5)
    _, c = _model(groups, init_seed=6)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_bf16_autocast_keeps_float32_parameters_residual_and_gradients(groups):
    """The reference's mixed precision (docs/algorithms.md §5.5), run by CPU autocast here and by
    the same code on CUDA: parameters, the residual stream, cond and every gradient stay float32;
    only the blocks' matmuls, attention and the head run in bf16, so the logits are bf16.

    Bound: bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4% per operation);
    through two blocks and the head, and back, errors add up over about ten roundings: 5% of
    the float32 model's largest value (measured: 1.4% for the logits, at most 3.4% for a
    parameter's gradient)."""
    cfg = ModelConfig.preset("tiny", vocab_size=97, seq_len=32)
    exact = build_pipeline(cfg, groups, AttentionSpec("bidirectional"))
    mixed = build_pipeline(
        cfg, groups, AttentionSpec("bidirectional"), compute_dtype=torch.bfloat16
    )
    _randomise(exact, 3)
    _randomise(mixed, 3)
    tokens, s = torch.randint(cfg.vocab_size, (2, cfg.seq_len)), torch.rand(2)
    first, *blocks, last = mixed.forward_funcs
    activations = first((tokens, s))
    for block in blocks:
        activations = block(activations)
        assert [a.dtype for a in activations] == [torch.float32, torch.float32]
    low = last(activations).logits()
    high = exact((tokens, s)).logits()
    assert low.dtype == torch.bfloat16 and high.dtype == torch.float32
    assert (low.float() - high).abs().max() < 0.05 * high.abs().max()
    weights = torch.randn(high.shape)  # a loss that reaches every logit
    (low.float() * weights).sum().backward()
    (high * weights).sum().backward()
    for (name, p_low), p_high in zip(mixed.named_parameters(), exact.parameters(), strict=True):
        assert p_low.dtype == p_low.grad.dtype == torch.float32, name
        err = (p_low.grad - p_high.grad).abs().max() / p_high.grad.abs().max()
        assert err < 0.05, (name, err.item())


def test_kv_cached_decoding_equals_the_full_causal_forward(groups):
    from dlm_pretrain.parallel.attention import KVCache

    cfg, model = _model(groups, kind="causal")
    _randomise(model, 4)
    tokens = torch.randint(cfg.vocab_size, (2, 12))
    s = torch.zeros(2)
    full = model((tokens, s)).logits()
    first, *blocks, last = model.forward_funcs
    caches = [KVCache() for _ in blocks]
    steps = []
    for chunk in (tokens[:, :5], tokens[:, 5:6], tokens[:, 6:12]):  # prefill, then 1, then 6
        hidden, cond = first((chunk, s))
        for block, cache in zip(blocks, caches, strict=True):
            hidden = block.step(hidden, cond, cache)
        steps.append(last((hidden, cond)).logits())
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_split_table_names_every_tensor_parallel_parameter_and_its_axis(groups):
    """Checkpoint tools join shards by TENSOR_SPLIT_DIMS without building the model: it must
    agree with megatron's own marks on every parameter."""
    _, model = _model(groups)
    for name, p in model.named_parameters():
        local = name.split(".", 1)[1]  # "3.qkv.weight" -> "qkv.weight"
        split = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        assert TENSOR_SPLIT_DIMS.get(local) == split, name
