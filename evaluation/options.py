"""What `dlm eval` runs, checked before any model is loaded (no heavy imports here: the CLI
checks the options before it imports megatron-core and DeepSpeed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dlm_pretrain.common.errors import ConfigError
from dlm_pretrain.pretrain.config import SamplingConfig


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    likelihood: bool = True
    gen_ppl: bool = False
    speed: bool = True
    tasks: tuple[str, ...] = ()  # lm-eval task names
    data: str = ""  # a prepared dataset for the likelihood; default the run's own
    sequences: int = 256
    draws: int = 1  # t draws per validation sequence (likelihood)
    task_draws: int = 32  # t draws per lm-eval request (diffusion families)
    judge: str = ""  # an AR run or export, or a Hugging Face causal LM folder
    samples: int = 16  # per sampler setting
    steps: tuple[int, ...] = (16, 64, 128)
    top_p: tuple[float, ...] = (1.0,)
    final_step: tuple[str, ...] = ("default",)  # sampling.final_step values (MDLM, Duo, GIDD)
    batch: int = 16  # samples per sampler call; speed is timed at batch 1 and this
    repeats: int = 3  # timed calls per speed figure (the median is reported)
    include_path: str = ""  # lm-eval task folders
    limit: int | None = None  # lm-eval: documents per task
    out: Path = Path("runs/eval")
    seed: int = 0


def check_options(opts: EvalOptions) -> None:
    """Refuse what cannot run, before any model is loaded."""
    if opts.gen_ppl and not opts.judge:
        raise ConfigError("--gen-ppl needs --judge: an AR run or export, or a HF causal LM folder")
    if not (opts.likelihood or opts.gen_ppl or opts.speed or opts.tasks):
        raise ConfigError("nothing to evaluate: choose --likelihood, --gen-ppl, --speed or --tasks")
    for final in opts.final_step:
        SamplingConfig(final_step=final)  # an unknown rule fails naming the choices
    if min(opts.steps) < 1 or min(opts.batch, opts.samples, opts.sequences, opts.repeats) < 1:
        raise ConfigError(
            "--steps, --batch, --samples, --sequences and --repeats must be at least 1"
        )
