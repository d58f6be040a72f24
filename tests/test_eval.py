"""dlm eval: the likelihood equals the trainer's validation where both are exact, gen-PPL of
a judge's own samples is the judge's own perplexity on them, speed figures are timed, the
whole command writes and logs every part, and bad input is refused before models load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.evaluation.evaluate import evaluate
from dlm_pretrain.evaluation.generation import (
    Generated,
    HFJudge,
    RunJudge,
    load_judge,
    sample_texts,
    score,
    unigram_entropy,
)
from dlm_pretrain.evaluation.likelihood import dataset_likelihood
from dlm_pretrain.evaluation.options import EvalOptions
from dlm_pretrain.evaluation.pareto import ParetoPoint, mark_frontier
from dlm_pretrain.evaluation.speed import sampling_speed
from dlm_pretrain.evaluation.target import load_target
from dlm_pretrain.launch.cli import main
from dlm_pretrain.pretrain.config import SamplingConfig
from dlm_pretrain.pretrain.trained_model import forward, sampler_of
from test_train import _train

STEPS = ("train.steps=20", "train.val_every=20", "train.checkpoint_every=20")


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    """A tiny AR (the judge) and a tiny MDLM, 20 steps each."""
    root = tmp_path_factory.mktemp("eval-runs")
    return {
        name: _train(dataset, root / name, f"objective.name={name}", *STEPS)
        for name in ("ar", "mdlm")
    }


@pytest.mark.slow  # trains two runs (module fixture)
def test_ar_likelihood_is_the_validation_figure(runs):
    """AR's bound is exact, so on the validation sequences the trainer scored it is the
    trainer's own figure (a different code path: per-sequence means, other batches)."""
    model = load_target(runs["ar"])
    meta = json.loads(next((runs["ar"] / "checkpoints").glob("step*/dlm_meta.json")).read_text())
    found = dataset_likelihood(model, sequences=32, draws=1, batch_rows=5)
    assert found.sequences == 32
    assert found.nats_per_token == pytest.approx(meta["validation"]["loss"], rel=1e-5)
    assert 0 < found.standard_error < 0.5


@pytest.mark.slow  # trains two runs (module fixture)
def test_mdlm_likelihood_draws_narrow_the_standard_error(runs):
    model = load_target(runs["mdlm"])
    one = dataset_likelihood(model, sequences=48, draws=1)
    eight = dataset_likelihood(model, sequences=48, draws=8)
    assert eight.standard_error < one.standard_error
    assert abs(one.nats_per_token - eight.nats_per_token) < 3 * one.standard_error


@pytest.mark.slow  # trains two runs (module fixture)
def test_run_judge_scores_its_own_samples_as_a_float64_forward_does(runs):
    """Samples one window longer than the judge's context: the windows, their start token
    and the shift by one must reproduce the judge's own log-probabilities."""
    judge = RunJudge(load_target(runs["ar"]))
    model = judge.model
    generated = sample_texts(model, SamplingConfig(num_samples=3, seed=4), batch=2)
    assert generated.tokens.shape == (3, model.seq_len)
    nats, count = judge.nats(generated)
    reference, step = 0.0, model.seq_len - 1
    eos = model.tokenizer.special.eos
    for row in generated.tokens.tolist():
        for i in range(0, len(row), step):
            x = torch.tensor([[eos, *row[i : i + step]]])
            logits = forward(model, (x, torch.zeros(1))).logits().double()
            logp = logits.masked_fill(~model.vocab.real, -math.inf).log_softmax(-1)[0, :-1]
            reference -= logp.gather(-1, x[0, 1:, None]).sum().item()
    assert count == generated.tokens.numel()
    assert nats == pytest.approx(reference, rel=1e-5)


def _word_level_lm(folder, words: list[str]) -> None:
    """A causal LM folder as transformers writes one: a tiny GPT-2 with random weights and a
    word-level tokenizer (decoding then encoding gives the ids back)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_hf_judge_gen_ppl_of_its_own_samples_is_its_perplexity(tmp_path):
    """A Hugging Face judge samples text itself; scored through the decode, retokenize and
    window path, its gen-PPL is transformers' own perplexity of those tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    words = [f"w{i}" for i in range(40)]
    _word_level_lm(tmp_path, words)
    lm, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tmp_path),
        AutoTokenizer.from_pretrained(tmp_path),
    )
    torch.manual_seed(1)
    bos = torch.full((4, 1), tokenizer.bos_token_id)
    ids = lm.generate(
        bos,
        do_sample=True,
        top_k=0,
        max_new_tokens=24,
        min_new_tokens=24,
        suppress_tokens=[tokenizer.bos_token_id, tokenizer.unk_token_id],
        pad_token_id=tokenizer.bos_token_id,
    )
    with torch.no_grad():
        own = math.exp(lm(ids, labels=ids).loss.item())
    texts = tokenizer.batch_decode(ids[:, 1:])
    generated = Generated(ids[:, 1:], texts, tokenizer_sha256="")
    judged = score(generated, HFJudge(tmp_path, torch.device("cpu")))
    assert judged.judged_tokens == 4 * 24
    assert judged.gen_ppl == pytest.approx(own, rel=1e-5)
    assert judged.entropy == pytest.approx(unigram_entropy(ids[:, 1:]))


def test_unigram_entropy_against_counts():
    tokens = torch.tensor([[1, 1, 2, 3], [5, 5, 5, 5]])
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / 2
    assert unigram_entropy(tokens) == pytest.approx(expected)


@pytest.mark.slow  # trains two runs (module fixture)
def test_speed_is_timed_not_estimated(runs):
    """More denoising steps take longer, and tokens/s is the batch's tokens over that time."""
    model = load_target(runs["mdlm"])
    fast, slow = sampling_speed(
        sampler_of(model, SamplingConfig()), [2, 48], [2], model.name, repeats=1
    )
    assert (fast.steps, slow.steps) == (2, 48)
    assert slow.seconds > fast.seconds > 0
    assert slow.forward_passes > fast.forward_passes
    assert fast.tokens_per_s == pytest.approx(2 * model.seq_len / fast.seconds)


def test_pareto_frontier():
    points = mark_frontier(
        [
            ParetoPoint("a", 8, 1000.0, 90.0),  # fastest
            ParetoPoint("a", 64, 100.0, 40.0),  # best
            ParetoPoint("b", 8, 500.0, 95.0),  # slower and worse than a/8
            ParetoPoint("b", 64, 300.0, 60.0),  # between: on the frontier
        ]
    )
    assert [p.on_frontier for p in points] == [True, True, False, True]


@pytest.mark.slow
def test_eval_command_writes_and_logs_every_part(runs, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "eval"
    args = ["eval", str(runs["mdlm"]), "--judge", str(runs["ar"]), "--steps", "2,8"]
    args += ["--samples", "2", "--batch", "2", "--sequences", "8", "--draws", "2"]
    assert main([*args, "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "likelihood:" in printed and "Pareto" in printed and "AR baseline" in printed
    result = json.loads((out / "eval.json").read_text())
    report = result["targets"]["mdlm"]
    assert report["likelihood"]["draws"] == 2 and report["likelihood"]["sequences"] == 8
    assert [g["steps"] for g in report["generation"]] == [2, 8]
    assert all(g["gen_ppl"] > 1 and g["entropy"] > 0 for g in report["generation"])
    assert {(p["steps"], p["batch"]) for p in report["speed"]} == {(2, 1), (8, 1), (2, 2), (8, 2)}
    seq_len = report["speed"][0]["seq_len"]
    assert {p["forward_passes"] for p in result["ar_baseline"]} == {seq_len - 1}
    assert any(p["on_frontier"] for p in result["pareto"])
    assert (out / "pareto.png").stat().st_size > 0 and (out / "pareto.csv").is_file()
    run_id = (runs["mdlm"] / "mlflow_run_id").read_text()
    uri = f"sqlite:///{runs['mdlm'].parent / 'mlflow.db'}"
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert metrics["eval/nll"] == pytest.approx(report["likelihood"]["nats_per_token"])
    assert metrics["eval/gen_ppl/T8_p1_default"] == pytest.approx(
        report["generation"][1]["gen_ppl"]
    )


@pytest.mark.slow  # trains two runs (module fixture)
def test_bad_input_is_refused_before_models_load(runs, tmp_path):
    with pytest.raises(ConfigError, match="--gen-ppl needs --judge"):
        evaluate([str(runs["mdlm"])], EvalOptions(gen_ppl=True, out=tmp_path))
    with pytest.raises(ConfigError, match="neither a run directory"):
        evaluate([str(tmp_path)], EvalOptions(out=tmp_path))
    with pytest.raises(ConfigError, match="autoregressive judge"):
        load_judge(runs["mdlm"], torch.device("cpu"))
