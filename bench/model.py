"""Forward+backward throughput of the DDiT presets on this machine, against its matmul peak
and against a straightforward PyTorch DiT of the same shape.

    python bench/model.py [--sizes tiny,cpu-small,cpu-base,6M,19M,34M] [--seq-len 512]
                          [--objectives mdlm,ar,duo]

For each preset: tokens/s and achieved FLOP/s of one training micro-step (model forward,
MDLM loss, backward; FLOPs by pretrain.flops' exact convention), as a fraction of the float32
matmul peak measured by this script in the same run (target for 19M: at least 35%).
Then, per objective, the step time and the peak extra resident memory of the step (VmHWM
over the resident set before it; parameters and inputs exist, gradients do not) of ours and
of bench/baseline_dit.py (every position's logits, the loss as the reference code writes it),
and our speed-up.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from baseline_dit import BaselineDiT
from dlm_pretrain.parallel.config import ModelConfig, ParallelConfig, parameter_count
from dlm_pretrain.parallel.groups import Runtime, init_process_groups
from dlm_pretrain.parallel.model import build_pipeline
from dlm_pretrain.pretrain.config import ObjectiveConfig
from dlm_pretrain.pretrain.flops import training_flops_per_sequence
from dlm_pretrain.pretrain.objectives import build_objective
from dlm_pretrain.pretrain.objectives.schedule import sample_t
from dlm_pretrain.pretrain.objectives.vocab import Vocab
from loss import memory_mib, reference_cross_entropy, reference_duo, reset_peak_memory


def _time_and_memory(step, parameters=(), repeats: int = 3) -> tuple[float, float]:
    """(best seconds, largest peak extra MiB) of `step` over `repeats` runs after a warm-up;
    the gradients of `parameters` are dropped before each run, so each run allocates them."""
    step()
    best, peak = float("inf"), 0.0
    for _ in range(repeats):
        for p in parameters:
            p.grad = None
        before = reset_peak_memory()
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
        peak = max(peak, memory_mib("VmHWM") - before)
    return best, peak


def matmul_peak_flops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _time_and_memory(lambda: a @ b, repeats=5)[0]


def _baseline_loss(name: str, logits, x0, xt, t, vocab):
    """The loss over every position's logits, as the reference code computes it."""
    if name == "ar":
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), x0[:, 1:].flatten())
    per_token_t = t.repeat_interleave(x0.shape[1])
    reference = reference_duo if name == "duo" else reference_cross_entropy
    return reference(logits.flatten(0, 1), x0.flatten(), xt.flatten(), per_token_t, vocab).mean()


def measure(cfg: ModelConfig, name: str, batch: int, groups, baseline: bool) -> dict:
    """(seconds, MiB) of one training micro-step of ours (model forward, the objective's
    loss, backward) and, with `baseline`, of the baseline on the same batch; one model alive
    at a time."""
    objective = build_objective(ObjectiveConfig(name=name))
    vocab = Vocab.build(cfg.vocab_size, mask_id=4, never_in_data=(3,))
    x0 = torch.randint(5, cfg.vocab_size, (batch, cfg.seq_len))
    t = sample_t(0, 0, torch.arange(batch), batch, objective.t_max)
    inputs, labels = objective.batch(x0, t, torch.arange(batch), vocab)
    result = {"ours": _time_ours(cfg, objective, inputs, labels, vocab, groups)}
    if baseline:
        result["baseline"] = _time_baseline(cfg, name, inputs, x0, t, vocab)
    return result


def _time_ours(cfg: ModelConfig, objective, inputs, labels, vocab, groups) -> tuple:
    model = build_pipeline(cfg, groups, objective.attention_spec())

    def step() -> None:
        objective.train_loss(model(inputs), *labels, vocab).backward()

    return _time_and_memory(step, model.parameters())


def _time_baseline(cfg: ModelConfig, name: str, inputs, x0, t, vocab) -> tuple:
    model = BaselineDiT(cfg, causal=name == "ar")
    xt, s = inputs[0], inputs[1]

    def step() -> None:
        _baseline_loss(name, model(xt, s), x0, xt, t, vocab).backward()

    return _time_and_memory(step, model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,cpu-small,cpu-base,6M,19M,34M")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32001)
    parser.add_argument("--objectives", default="mdlm,ar,duo")
    args = parser.parse_args()
    groups = init_process_groups(ParallelConfig(), Runtime.detect())
    peak = matmul_peak_flops()
    objectives = args.objectives.split(",")
    throughput, comparison = [], []
    for size in args.sizes.split(","):
        cfg = ModelConfig.preset(size, vocab_size=args.vocab_size, seq_len=args.seq_len)
        results = {
            name: measure(cfg, name, args.batch, groups, baseline=name in objectives)
            for name in dict.fromkeys(["mdlm", *objectives])  # MDLM: the throughput table's
        }
        seconds = results["mdlm"]["ours"][0]
        flops = training_flops_per_sequence(cfg, "mdlm", args.seq_len) * args.batch
        throughput.append(
            f"{size:>10} {parameter_count(cfg) / 1e6:>8.1f}M {seconds:>8.3f} "
            f"{args.batch * args.seq_len / seconds:>9.0f} {flops / seconds / 1e9:>8.1f} "
            f"{flops / seconds / peak:>7.0%}"
        )
        for name in objectives:
            (ours_s, ours_mib), (base_s, base_mib) = (
                results[name]["ours"],
                results[name]["baseline"],
            )
            comparison.append(
                f"| {size} | {name} | {ours_s:.3f} | {base_s:.3f} | {base_s / ours_s:.2f}x | "
                f"{ours_mib:.0f} | {base_mib:.0f} | {ours_mib / base_mib:.0%} |"
            )
    print(f"\nfloat32 matmul peak ({torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    print(f"micro-batch {args.batch} x {args.seq_len} tokens, V = {args.vocab_size}, MDLM loss")
    print(f"{'size':>10} {'params':>9} {'step s':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'of peak':>8}")
    print("\n".join(throughput))
    print("\nagainst bench/baseline_dit.py (step s, peak extra memory of the step):")
    print(
        "| size | objective | ours s | baseline s | speed-up | ours MiB | baseline MiB | memory |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(comparison))


if __name__ == "__main__":
    main()
