"""Forward+backward throughput of the DDiT presets on this machine, against its matmul peak.

    python bench/model.py [--sizes tiny,cpu-small,cpu-base,6M,19M,34M] [--seq-len 512]

For each preset: tokens/s and achieved FLOP/s of one training micro-step (model forward,
MDLM loss, backward; FLOPs by pretrain.flops' exact convention), as a fraction of the float32
matmul peak measured by this script in the same run (target for 19M: at least 35%).
"""

from __future__ import annotations

import argparse
import time

import torch
from dlm_pretrain.parallel.config import ModelConfig, ParallelConfig, parameter_count
from dlm_pretrain.parallel.groups import Runtime, init_process_groups
from dlm_pretrain.parallel.model import build_pipeline
from dlm_pretrain.pretrain.flops import training_flops_per_sequence
from dlm_pretrain.pretrain.objectives import MDLM
from dlm_pretrain.pretrain.objectives.schedule import sample_t
from dlm_pretrain.pretrain.objectives.vocab import Vocab


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_flops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _best_seconds(lambda: a @ b, 5)


def train_step_seconds(cfg: ModelConfig, batch: int, groups) -> float:
    mdlm = MDLM(loss_type="cross_entropy")
    model = build_pipeline(cfg, groups, mdlm.attention_spec())
    vocab = Vocab.build(cfg.vocab_size, mask_id=4, never_in_data=(3,))
    x0 = torch.randint(5, cfg.vocab_size, (batch, cfg.seq_len))
    t = sample_t(0, 0, torch.arange(batch), batch)
    xt = mdlm.noise(x0, t, torch.arange(batch), vocab)

    def step() -> None:
        logits = model((xt, mdlm.time_input(t)))
        mdlm.per_token_loss(logits, x0, xt, t, vocab).mean().backward()

    return _best_seconds(step, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,cpu-small,cpu-base,6M,19M,34M")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32001)
    args = parser.parse_args()
    groups = init_process_groups(ParallelConfig(), Runtime.detect())
    peak = matmul_peak_flops()
    print(f"\nfloat32 matmul peak ({torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    print(f"micro-batch {args.batch} x {args.seq_len} tokens, V = {args.vocab_size}, MDLM loss")
    print(f"{'size':>10} {'params':>9} {'step s':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'of peak':>8}")
    for size in args.sizes.split(","):
        cfg = ModelConfig.preset(size, vocab_size=args.vocab_size, seq_len=args.seq_len)
        seconds = train_step_seconds(cfg, args.batch, groups)
        flops = training_flops_per_sequence(cfg, "mdlm", args.seq_len) * args.batch
        print(
            f"{size:>10} {parameter_count(cfg) / 1e6:>8.1f}M {seconds:>8.3f} "
            f"{args.batch * args.seq_len / seconds:>9.0f} {flops / seconds / 1e9:>8.1f} "
            f"{flops / seconds / peak:>7.0%}"
        )


if __name__ == "__main__":
    main()
