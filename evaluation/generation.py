"""Generation quality (docs/algorithms.md §8.2): samples per sampler setting, their generative
perplexity under a judge language model and their unigram entropy.

The judge is one of our AR checkpoints (a run directory or its export), scored on the sample's
own token ids when it shares the target's tokenizer and on the decoded text otherwise, or any
Hugging Face causal LM folder on disk, which always scores the decoded text with its own
tokenizer. Either way a sample is scored in windows of the judge's context, each starting
from the judge's document-start token, and gen-PPL = exp(total nats / scored tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.evaluation.likelihood import sequence_nats
from dlm_pretrain.evaluation.target import is_hf_export, is_our_export, is_run_dir, load_target
from dlm_pretrain.pretrain.config import SamplingConfig
from dlm_pretrain.pretrain.objectives import AR
from dlm_pretrain.pretrain.trained_model import TrainedModel, sampler_of
from torch import Tensor


@dataclass(frozen=True)
class Generated:
    tokens: Tensor  # [N, L] int64, on the host
    texts: list[str]
    tokenizer_sha256: str


@dataclass(frozen=True)
class GenerationScore:
    gen_ppl: float
    entropy: float  # nats, mean over samples of the entropy of each sample's unigram counts
    samples: int
    judged_tokens: int


class Judge(Protocol):
    name: str

    def nats(self, generated: Generated) -> tuple[float, int]:
        """Total nats of the samples under the judge and the number of tokens scored."""


def sample_texts(model: TrainedModel, sampling: SamplingConfig, batch: int) -> Generated:
    """sampling.num_samples samples in calls of at most `batch`, seeds seed, seed + 1, ..."""
    rows, left, call = [], sampling.num_samples, 0
    while left:
        n = min(batch, left)
        cfg = sampling.model_copy(update={"num_samples": n, "seed": sampling.seed + call})
        rows.append(sampler_of(model, cfg).draw(cfg).tokens.cpu())
        left, call = left - n, call + 1
    tokens = torch.cat(rows)
    texts = [model.tokenizer.decode(row.tolist()) for row in tokens]
    return Generated(tokens, texts, model.tokenizer.sha256)


def unigram_entropy(tokens: Tensor) -> float:
    """Mean over rows of the Shannon entropy (nats) of the row's token counts. [N, L]"""
    entropies = []
    for row in tokens:
        p = row.unique(return_counts=True)[1].double() / len(row)
        entropies.append(-(p * p.log()).sum().item())
    return sum(entropies) / len(entropies)


def score(generated: Generated, judge: Judge) -> GenerationScore:
    nats, tokens = judge.nats(generated)
    return GenerationScore(
        math.exp(nats / tokens), unigram_entropy(generated.tokens), len(generated.texts), tokens
    )


def windows(ids: list[int], start_id: int, context: int) -> list[list[int]]:
    """`ids` cut into windows of context - 1 tokens, each after `start_id`."""
    step = context - 1
    return [[start_id, *ids[i : i + step]] for i in range(0, len(ids), step)]


class RunJudge:
    """One of our AR checkpoints: exact NLL through the objective's own loss."""

    def __init__(self, model: TrainedModel) -> None:
        if not isinstance(model.objective, AR):
            raise ConfigError(
                f"the judge {model.run_dir} is a {model.cfg.objective.name} model; gen-PPL needs "
                "an autoregressive judge (objective.name=ar) or a Hugging Face causal LM folder"
            )
        self.model, self.name = model, model.name

    def nats(self, generated: Generated) -> tuple[float, int]:
        tokenizer = self.model.tokenizer
        if generated.tokenizer_sha256 == tokenizer.sha256:
            samples = [row.tolist() for row in generated.tokens]
        else:
            samples = [ids.tolist() for ids in tokenizer.encode(generated.texts)]
        total, count = 0.0, 0
        for ids in samples:
            for window in windows(ids, tokenizer.special.eos, self.model.seq_len):
                x0 = torch.tensor([window], device=self.model.runtime.device)
                scored = torch.ones_like(x0, dtype=torch.bool)
                scored[:, 0] = False
                total += sequence_nats(self.model, x0, draws=1, scored=scored)[0].item()
                count += len(window) - 1
        return total, count


class HFJudge:
    """Any causal LM folder transformers loads (AutoModelForCausalLM), scoring the text
    retokenized by its own tokenizer, after its BOS (else its EOS) token."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.lm = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
        self.name, self.device = folder.name, device
        config = self.lm.config
        self.context = getattr(config, "max_position_embeddings", None) or config.n_positions
        start = self.tokenizer.bos_token_id
        self.start_id = self.tokenizer.eos_token_id if start is None else start
        if self.start_id is None:
            raise ConfigError(f"the judge {folder}'s tokenizer has neither a BOS nor an EOS token")

    @torch.no_grad()
    def nats(self, generated: Generated) -> tuple[float, int]:
        total, count = 0.0, 0
        for text in generated.texts:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for window in windows(ids, self.start_id, self.context):
                x = torch.tensor([window], device=self.device)
                logp = self.lm(x).logits[0, :-1].double().log_softmax(-1)
                total -= logp.gather(-1, x[0, 1:, None]).sum().item()
                count += len(window) - 1
        return total, count


def load_judge(path: str | Path, device: torch.device) -> Judge:
    """Our AR run or export, else any Hugging Face causal LM folder."""
    path = Path(path)
    if is_run_dir(path) or is_our_export(path):
        return RunJudge(load_target(path))
    if is_hf_export(path):
        return HFJudge(path, device)
    raise ConfigError(
        f"judge {path} is neither a run directory, a `dlm export-hf` folder nor a Hugging Face "
        "causal LM folder (config.json)"
    )
