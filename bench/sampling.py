"""Sampling throughput of every sampler against its steps, with AR and its key/value cache as
the baseline, all timed in this process.

    python bench/sampling.py [--size cpu-base] [--steps 8,32,128] [--batches 1,16]
                             [--seq-len 256] [--vocab-size 8192] [--repeats 1]
                             [--objectives AR,MDLM,Duo,GIDD,Eso-LM,"Eso-LM a0=0.5"]

Models have fresh weights (speed does not depend on them); the geometry defaults to the
embedded corpus's (L = 256, V = 8192). Prints tokens/s and seconds per call (the latency of
each sequence in the batch) per (objective, steps, batch), and each one's speed-up over AR at
the same batch size.
"""

from __future__ import annotations

import argparse

import torch
from dlm_pretrain.evaluation.speed import SpeedPoint, sampling_speed
from dlm_pretrain.launch.quiet import hidden_prints
from dlm_pretrain.parallel.config import ModelConfig, ParallelConfig
from dlm_pretrain.parallel.groups import Runtime, init_process_groups
from dlm_pretrain.parallel.model import build_pipeline
from dlm_pretrain.pretrain.objectives import AR, GIDD, MDLM, Duo, EsoLM, Objective
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from dlm_pretrain.pretrain.sampling import Sampler

OBJECTIVES: dict[str, Objective] = {
    "AR": AR(),
    "MDLM": MDLM(),
    "Duo": Duo(),
    "GIDD": GIDD(),
    "Eso-LM": EsoLM(),
    "Eso-LM a0=0.5": EsoLM(alpha_0=0.5, batch_split=0.5),
}


def _sampler(objective: Objective, cfg: ModelConfig, vocab: Vocab, runtime: Runtime) -> Sampler:
    with hidden_prints(verbose=False):  # DeepSpeed's PipelineModule prints its layout
        groups = init_process_groups(ParallelConfig(), runtime)
        module = build_pipeline(
            cfg, groups, objective.attention_spec(), compute_dtype=runtime.dtype
        )
    module.to(runtime.device).eval()
    return Sampler(
        objective, module.forward_funcs, vocab.to(runtime.device), cfg.seq_len, 1, runtime.device
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="cpu-base")
    parser.add_argument("--steps", default="8,32,128")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="names to time")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    runtime = Runtime.detect()
    vocab = Vocab.build(args.vocab_size, mask_id=args.vocab_size - 1)
    cfg = ModelConfig.preset(args.size, vocab_size=args.vocab_size, seq_len=args.seq_len)
    print(
        f"{args.size}, L={args.seq_len}, V={args.vocab_size}, {runtime.device}, "
        f"{runtime.dtype}, {torch.get_num_threads()} threads"
    )
    points: list[SpeedPoint] = []
    for name in args.objectives.split(","):
        objective = OBJECTIVES[name]
        sampler = _sampler(objective, cfg, vocab, runtime)
        points += sampling_speed(sampler, steps, batches, name, args.repeats)
        _print([p for p in points if p.target == name], points)


def _print(rows: list[SpeedPoint], points: list[SpeedPoint]) -> None:
    ar = {p.batch: p.tokens_per_s for p in points if p.objective == "AR"}
    for p in rows:
        speedup = f"{p.tokens_per_s / ar[p.batch]:6.2f}x AR" if p.batch in ar else ""
        print(
            f"{p.target:>14}  steps {p.steps:4d}  batch {p.batch:3d}  "
            f"{p.tokens_per_s:10.1f} tok/s  {p.seconds:8.3f} s/call  "
            f"{p.forward_passes:4d} passes  {speedup}",
            flush=True,
        )


if __name__ == "__main__":
    main()
