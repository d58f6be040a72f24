"""dlm export-hf: the exported folder, loaded by transformers in a fresh interpreter that cannot
import dlm_pretrain, gives our model's logits and samples, from checkpoints of any tensor x
pipeline layout; sharded and bfloat16 exports load; bad input is refused with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dlm_pretrain.common.errors import CheckpointError, ConfigError
from test_train import ONE_THREAD, _torchrun, _train

OBJECTIVES = ("ar", "mdlm", "duo", "gidd", "esolm")
# Eso-LM with both branches: the exported sampler must also decode the sequential tail
OPTIONS = {"esolm": ("objective.alpha_0=0.5", "objective.batch_split=0.5")}
SAMPLING = {"num_samples": 2, "steps": 8, "seed": 5}
# Non-default sampler options, sampled after the defaults (top_p < 1 so that its placement
# matters; at 8 steps about 1/8 of GIDD's tokens are still masked at its last step).
OPTION_SETTINGS = {
    "duo": [
        {"final_step": "ancestral", "top_p": 0.9},  # the posterior's nucleus, at alpha_s = 1 too
        {"top_p": 0.9, "top_p_on": "denoiser"},
    ],
    "mdlm": [{"final_step": "greedy", "top_p": 0.9}],
    "gidd": [{"final_step": "greedy", "top_p": 0.9}],
    "ar": [{"start_token": "eos", "top_p": 0.9}],
}
# What each exported model's `sample` takes of our SamplingConfig (AR: no steps, no last step)
HF_SAMPLE_KEYS = {
    "DLMForCausalLM": ("num_samples", "seed", "top_p", "start_token"),
    "DLMForMaskedLM": ("num_samples", "seed", "top_p", "steps", "final_step", "top_p_on"),
}
# One interpreter for every export: transformers alone, our package refused at import.
HF_SCRIPT = r"""
import json, sys
import torch


class NoDlm:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "dlm_pretrain":
            raise ImportError(f"the export imported {name}")


sys.meta_path.insert(0, NoDlm())
import transformers

for job in json.loads(open(sys.argv[1]).read()):
    auto = getattr(transformers, job["auto"])
    model = auto.from_pretrained(job["folder"], trust_remote_code=True)
    with torch.no_grad():
        out = {"logits": model(**torch.load(job["inputs"])).logits}
    out["dtype"] = str(next(model.parameters()).dtype)
    if job["samples"]:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            job["folder"], trust_remote_code=True
        )
        out["samples"] = [model.sample(**settings) for settings in job["samples"]]
        out["texts"] = tokenizer.batch_decode(out["samples"][0])
    torch.save(out, job["outputs"])
"""


def _randomize(folder: Path, seed: int) -> None:
    """Fresh weights of order one in every parameter (trained for two steps, the attention
    and MLP branches are still nearly closed by their zero-initialised gates)."""
    from dlm_pretrain.pretrain.checkpoint_files import read_weights, write_weights

    generator = torch.Generator().manual_seed(seed)
    state = read_weights(folder)
    for value in state.values():
        if value is not None:
            value.copy_(torch.randn(value.shape, generator=generator) * value.shape[-1] ** -0.5)
    write_weights(state, folder, tensor=1)


def _our_model(run_dir: Path):
    """Our pipeline in this process at tensor 1 x pipeline 1, whatever layout saved it."""
    from dlm_pretrain.pretrain.trained_model import load_trained_model

    model = load_trained_model(run_dir)
    return model.objective, model.layers, model.vocab, model.tokenizer, model.seq_len


@torch.no_grad()
def _reference(run_dir: Path, inputs: Path, seed: int, samplings: list[dict]) -> dict:
    """Our logits on fresh token ids and times (t near 1e-3 and near 1 included), restricted
    to the tokenizer's ids, and our samples under each of `samplings` (SamplingConfig
    settings); the inputs are saved to `inputs` as the exported forward's arguments. Sorted
    attention also gets a random order of each row, in the stage tuple's layout
    (objective.batch)."""
    from dlm_pretrain.pretrain.config import SamplingConfig
    from dlm_pretrain.pretrain.sampling import _Layers, generate, start_id

    objective, layers, vocab, tokenizer, seq_len = _our_model(run_dir)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(tokenizer.vocab_size, (3, seq_len), generator=generator)
    t = torch.tensor([1e-3, 0.999, torch.rand(1, generator=generator).item()])
    hf_inputs = {"input_ids": tokens, "timesteps": t}
    for layer in layers:
        layer.eval()
    if objective.attention_spec().kind == "sorted":  # a sampler's view: plain sorted rows
        positions = torch.stack([torch.randperm(seq_len, generator=generator) for _ in t])
        hf_inputs["positions"] = positions
        logits = _Layers(layers).logits(tokens, objective.time_input(t), positions)
    else:
        logits = (tokens, objective.time_input(t))
        for layer in layers:
            logits = layer(logits)
        logits = logits.logits()
    torch.save(hf_inputs, inputs)
    reference = {"logits": logits[..., : tokenizer.vocab_size], "samples": []}
    for settings in samplings:
        cfg = SamplingConfig(**settings)
        first = start_id(tokenizer.special, cfg)
        reference["samples"].append(generate(objective, layers, vocab, cfg, seq_len, first).tokens)
    return reference


def _run_hf(jobs: list[dict], work: Path) -> None:
    """Every job in one fresh interpreter, outside the repository, with its own module cache."""
    (work / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_MODULES_CACHE": str(work / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-c", HF_SCRIPT, str(work / "jobs.json")]
    subprocess.run(command, check=True, cwd=work, env=env)


def _export_and_compare(exports: dict[str, tuple], work: Path) -> dict[str, dict]:
    """name -> (run dir, export_hf options, SamplingConfig settings to sample with): export,
    then our and transformers' outputs."""
    from dlm_pretrain.checkpoints_tools.export_hf import ARCHITECTURES, export_hf
    from dlm_pretrain.pretrain.config import load_config

    jobs, results = [], {}
    for i, (name, (run_dir, options, samplings)) in enumerate(exports.items()):
        folder = export_hf(run_dir, work / name, **options)
        inputs, outputs = work / f"{name}.inputs.pt", work / f"{name}.outputs.pt"
        results[name] = {"folder": folder, "ours": _reference(run_dir, inputs, i, samplings)}
        objective = load_config(str(run_dir / "config.yaml"), []).objective.name
        architecture, auto, _ = ARCHITECTURES[objective]
        keys = HF_SAMPLE_KEYS[architecture]
        samples = [{k: v for k, v in settings.items() if k in keys} for settings in samplings]
        jobs.append(
            {
                "folder": str(folder),
                "auto": auto,
                "inputs": str(inputs),
                "outputs": str(outputs),
                "samples": samples,
            }
        )
    _run_hf(jobs, work)
    for name, job in zip(results, jobs, strict=True):
        results[name]["hf"] = torch.load(job["outputs"])
    return results


def _assert_same_logits(result: dict) -> None:
    """float32 throughout; only the order of float32 sums may differ between the two models
    ([L, B] against [B, L] rows, matmul then bias against addmm): 1e-5."""
    ours, hf = result["ours"]["logits"], result["hf"]["logits"]
    assert result["hf"]["dtype"] == "torch.float32"
    assert hf.shape == ours.shape
    torch.testing.assert_close(hf, ours, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory) -> dict[str, Path]:
    """Two steps of each objective in this process, then fresh random weights."""
    root = tmp_path_factory.mktemp("export_runs")
    runs = {}
    for objective in OBJECTIVES:
        run_dir = _train(
            dataset, root / objective, "train.steps=2", "train.val_every=100",
            f"objective.name={objective}", "data.num_workers=1", *OPTIONS.get(objective, ()),
        )  # fmt: skip
        _randomize(run_dir / "checkpoints" / "step00000002", seed=len(runs))
        runs[objective] = run_dir
    return runs


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, dict]:
    exports = {}
    for objective, run_dir in runs.items():
        options = [{**SAMPLING, **o} for o in OPTION_SETTINGS.get(objective, [])]
        exports[objective] = (run_dir, {}, [SAMPLING, *options])
    exports["mdlm-sharded"] = (runs["mdlm"], {"max_shard_bytes": 100_000}, [])
    exports["duo-bf16"] = (runs["duo"], {"dtype": "bfloat16"}, [])
    return _export_and_compare(exports, tmp_path_factory.mktemp("exports"))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_exported_logits_equal_ours(exported, objective):
    _assert_same_logits(exported[objective])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_exported_sampler_gives_our_tokens(exported, objective):
    """Same seed, same draws: the exported sampler repeats pretrain/sampling.py token for
    token, with the default options and with OPTION_SETTINGS; the tokenizer decodes them (the
    model card's three lines). AR starts from BOS by default, from EOS on request."""
    result = exported[objective]
    settings = [SAMPLING, *OPTION_SETTINGS.get(objective, [])]
    ours, hf = result["ours"]["samples"], result["hf"]["samples"]
    for options, our_tokens, hf_tokens in zip(settings, ours, hf, strict=True):
        assert torch.equal(hf_tokens, our_tokens), options
    assert len(result["hf"]["texts"]) == SAMPLING["num_samples"]
    if objective == "ar":
        config = json.loads((result["folder"] / "config.json").read_text())
        assert (ours[0][:, 0] == config["bos_token_id"]).all() and config["bos_token_id"] >= 0
        assert (ours[1][:, 0] == config["eos_token_id"]).all()


def test_sharded_export_loads(exported):
    result = exported["mdlm-sharded"]
    index = json.loads((result["folder"] / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert shards == {p.name for p in result["folder"].glob("model-*.safetensors")}
    assert not (result["folder"] / "model.safetensors").exists()
    _assert_same_logits(result)


def test_bfloat16_export_loads(exported):
    """bfloat16 weights and matmuls (LayerNorms and the residual stream stay float32): each
    weight rounds to 8 bits of mantissa (relative 2^-9), compounded over two blocks and the
    head of unit-scale random weights (measured: 0.5% of the largest logit); 2% leaves room
    for that and not for a wrong parameter (errors of order 100%)."""
    result = exported["duo-bf16"]
    assert result["hf"]["dtype"] == "torch.bfloat16"
    ours, hf = result["ours"]["logits"], result["hf"]["logits"].float()
    assert (hf - ours).abs().max() <= 0.02 * ours.abs().max()


def test_config_json_names_the_model_and_the_run(exported, runs):
    config = json.loads((exported["ar"]["folder"] / "config.json").read_text())
    assert config["architectures"] == ["DLMForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_dlm.DLMForCausalLM"
    assert config["attention"] == "causal"
    assert config["dlm_run_config"]["objective"]["name"] == "ar"
    duo = json.loads((exported["duo"]["folder"] / "config.json").read_text())
    assert duo["time_conditioning"] and duo["attention"] == "bidirectional"
    card = (exported["mdlm"]["folder"] / "README.md").read_text()
    assert "AutoModelForMaskedLM.from_pretrained" in card and "validation perplexity" in card
    esolm = json.loads((exported["esolm"]["folder"] / "config.json").read_text())
    assert esolm["attention"] == "sorted" and not esolm["time_conditioning"]
    assert esolm["architectures"] == ["DLMForMaskedLM"]


def test_key_table_round_trip_and_qkv_order(runs):
    """from_hf inverts to_hf (padding rows come back as zeros); the exported qkv row
    (j, h, i) of [3, H, d_head] is our row (h, j, i) of [H, 3, d_head], element by element."""
    from dlm_pretrain.checkpoints_tools.hf_layout import from_hf, to_hf
    from dlm_pretrain.pretrain.checkpoint_files import read_weights

    ours = read_weights(runs["mdlm"] / "checkpoints" / "step00000002")
    vocab, padded, heads = 400, ours["0.embedding.weight"].shape[0], 2
    hf = to_hf(ours, heads, vocab)
    assert hf["backbone.vocab_embed.weight"].shape[0] == vocab
    assert hf["backbone.output_layer.linear.bias"].shape == (vocab,)
    qkv, exported_qkv = ours["2.qkv.weight"], hf["backbone.blocks.1.attn_qkv.weight"]
    head_dim = qkv.shape[1] // heads
    for j in range(3):
        for h in range(heads):
            for i in range(head_dim):
                row = exported_qkv[(j * heads + h) * head_dim + i]
                assert torch.equal(row, qkv[(h * 3 + j) * head_dim + i])
    back = from_hf(hf, heads, padded)
    assert back.keys() == ours.keys()
    for key, value in ours.items():
        if value is None:
            assert back[key] is None
            continue
        expected = value.clone()
        if key in ("0.embedding.weight", "3.head.weight", "3.head.bias"):
            expected[vocab:] = 0
        assert torch.equal(back[key], expected), key


def _assert_nothing_written(parent: Path) -> None:
    assert not parent.exists() or not any(parent.iterdir())


def test_a_non_empty_out_is_refused(runs, tmp_path):
    from dlm_pretrain.checkpoints_tools.export_hf import export_hf

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not empty"):
        export_hf(runs["mdlm"], out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_damaged_checkpoint_is_refused(runs, tmp_path, damage):
    from dlm_pretrain.checkpoints_tools.export_hf import export_hf
    from dlm_pretrain.pretrain.checkpoint_files import layer_file

    run_dir = tmp_path / "run"
    shutil.copytree(runs["duo"], run_dir)
    path = layer_file(run_dir / "checkpoints" / "step00000002", 2, 0)
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="layer_02-model_00"):
        export_hf(run_dir, tmp_path / "exports" / "model")
    _assert_nothing_written(tmp_path / "exports")


def test_no_checkpoint_a_missing_step_and_a_bad_dtype_are_refused(runs, tmp_path):
    from dlm_pretrain.checkpoints_tools.export_hf import export_hf

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copyfile(runs["ar"] / "config.yaml", empty / "config.yaml")
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        export_hf(empty, tmp_path / "exports" / "a")
    with pytest.raises(CheckpointError, match="step00000001"):
        export_hf(runs["ar"], tmp_path / "exports" / "b", step=1)
    with pytest.raises(ConfigError, match="float16"):
        export_hf(runs["ar"], tmp_path / "exports" / "c", dtype="float16")
    _assert_nothing_written(tmp_path / "exports")


def test_an_objective_without_an_export_is_refused(runs, tmp_path, monkeypatch):
    """An objective the config knows but the export does not (taken out of ARCHITECTURES
    here), and one the config does not know."""
    from dlm_pretrain.checkpoints_tools import export_hf as module

    monkeypatch.delitem(module.ARCHITECTURES, "duo")
    with pytest.raises(CheckpointError, match="'duo' cannot be exported"):
        module.export_hf(runs["duo"], tmp_path / "exports" / "a")
    run_dir = tmp_path / "run"
    shutil.copytree(runs["mdlm"], run_dir)
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("name: mdlm", "name: sedd"))
    with pytest.raises(ConfigError, match="sedd"):
        module.export_hf(run_dir, tmp_path / "exports" / "b")
    _assert_nothing_written(tmp_path / "exports")


@pytest.mark.slow
def test_the_export_of_a_tensor2_pipeline2_checkpoint_gives_our_logits(dataset, tmp_path):
    """A checkpoint written by a tensor 2 x pipeline 2 run (gloo, CPU), its layer files split
    over both tensor ranks and both stages, exported with its trained weights: the logits of
    one process loading it. (The join does not depend on the objective.)"""
    from dlm_pretrain.pretrain.checkpoint_files import read_meta

    run_dir = tmp_path / "t2xp2"
    extra = ("train.steps=2", "train.val_every=100", "data.num_workers=1")
    layout = ("parallel.tensor=2", "parallel.pipeline=2")
    command = _torchrun(dataset, run_dir, 4, "objective.name=duo", *extra, *layout)
    subprocess.run(command, check=True, env=ONE_THREAD, stdout=subprocess.DEVNULL)
    saved = read_meta(run_dir / "checkpoints" / "step00000002")["layout"]
    assert (saved["tensor"], saved["pipeline"]) == (2, 2)
    results = _export_and_compare({"t2xp2": (run_dir, {}, [])}, tmp_path / "exports")
    _assert_same_logits(results["t2xp2"])
