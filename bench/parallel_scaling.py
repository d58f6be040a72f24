"""Step time and communication volume of tensor and pipeline parallelism on this machine.

    python bench/parallel_scaling.py [--size cpu-base] [--seq-len 256] [--steps 6]

Runs the same training step (AR objective, global batch 16, micro-batch 4, float32, gloo)
as T=1 P=1, T=2 and P=2 (each layout through torchrun), and prints the median step time
and the bytes each kind of collective moved per step, next to the analytic count:

  tensor all-reduce, per micro-batch: forward 1 (embedding) + 2 per block (attention out,
    MLP out); backward 2 per block (qkv and fc1 input gradients) + 1 (head input gradient);
    each [L, b, d] float32; plus the loss's per-token scalars, 3 x b(L-1) float32.
  pipeline, per micro-batch: stage 0 sends (hidden [L, b, d], cond [b, c]) and receives
    their gradients (the figures are rank 0's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

# Run as a script, this file's folder heads sys.path and its name would hide the `parallel`
# package (imported inside the functions below, after this line).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

GLOBAL_BATCH, MICRO_BATCH, VOCAB = 16, 4, 4096
LAYOUTS = {"T1 P1": (1, 1), "T2": (2, 1), "P2": (1, 2)}
COUNTED = (
    "all_reduce",
    "send",
    "recv",
    "isend",
    "irecv",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
)


def _count_collectives(groups) -> Counter:
    """Wrap torch.distributed's collectives to add up the bytes each moves, by group."""
    moved: Counter = Counter()

    names = {
        tuple(dist.get_process_group_ranks(g)): n
        for n, g in (
            ("pipeline", groups.pp_group),
            ("data", groups.dp_group),
            ("tensor", groups.tp_group),
        )
    }

    def kind(group) -> str:
        ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
        if len(ranks) == 1:
            return "group of 1: moves nothing"
        return names.get(ranks, f"ranks {ranks}")

    def wrap(name: str, original):
        def counted(tensor, *args, **kwargs):
            first = tensor[0] if isinstance(tensor, list) else tensor
            size = first.numel() * first.element_size() if torch.is_tensor(first) else 0
            group = kwargs.get("group")
            label = "pipeline" if name in ("send", "recv", "isend", "irecv") else kind(group)
            moved[f"{name} ({label})"] += size
            return original(tensor, *args, **kwargs)

        return counted

    for name in COUNTED:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))
    return moved


def _worker(size: str, seq_len: int, steps: int, out: Path) -> None:
    from dlm_pretrain.parallel.config import ModelConfig, ParallelConfig
    from dlm_pretrain.parallel.groups import Runtime, init_process_groups
    from dlm_pretrain.parallel.model import build_pipeline
    from dlm_pretrain.pretrain.config import OptimConfig, TrainConfig
    from dlm_pretrain.pretrain.engine import build_engine
    from dlm_pretrain.pretrain.objectives import AR
    from dlm_pretrain.pretrain.objectives.vocab import Vocab

    torch.set_num_threads(max(1, os.cpu_count() // int(os.environ["WORLD_SIZE"])))
    tensor, pipeline = int(os.environ["BENCH_TENSOR"]), int(os.environ["BENCH_PIPELINE"])
    runtime = Runtime.detect("float32")
    groups = init_process_groups(ParallelConfig(tensor=tensor, pipeline=pipeline), runtime)
    cfg = ModelConfig.preset(size, vocab_size=VOCAB, seq_len=seq_len)
    vocab = Vocab.build(VOCAB, mask_id=4)

    def loss_fn(head, labels):
        tokens, t = labels
        return AR().train_loss(head, tokens, tokens, t, vocab)

    model = build_pipeline(cfg, groups, AR().attention_spec(), loss_fn=loss_fn)
    train = TrainConfig(global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH, steps=steps)
    engine = build_engine(model, train, OptimConfig(), groups, schedule=[(0, steps)])
    generator = torch.Generator().manual_seed(0)

    def micro_batches():
        while True:
            tokens = torch.randint(5, VOCAB, (MICRO_BATCH, seq_len), generator=generator)
            t = torch.zeros(MICRO_BATCH)
            yield (tokens, t), (tokens, t)

    data = micro_batches()
    engine.train_batch(data_iter=data)  # warm-up
    moved = _count_collectives(groups)
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        engine.train_batch(data_iter=data)
        times.append(time.perf_counter() - start)
    per_step = {k: v / steps for k, v in moved.items()}
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"seconds": statistics.median(times), "bytes": per_step}))


def analytic_bytes(size: str, seq_len: int) -> dict[str, float]:
    """Per step, as in the module docstring (float32)."""
    from dlm_pretrain.parallel.config import COND_DIM, SIZES

    d, layers, _ = SIZES[size]
    micro_batches = GLOBAL_BATCH // MICRO_BATCH
    activation = seq_len * MICRO_BATCH * d * 4
    tensor = (2 + 4 * layers) * activation + 3 * MICRO_BATCH * (seq_len - 1) * 4
    boundary = activation + MICRO_BATCH * COND_DIM * 4  # one direction
    return {"tensor": micro_batches * tensor, "pipeline": micro_batches * boundary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="cpu-base")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.size, args.seq_len, args.steps, args.worker)
        return
    expected = analytic_bytes(args.size, args.seq_len)
    print(
        f"{args.size}, L={args.seq_len}, V={VOCAB}, global batch {GLOBAL_BATCH}, "
        f"micro-batch {MICRO_BATCH}, float32, gloo, {os.cpu_count()} cores in all"
    )
    base = None
    for name, (tensor, pipeline) in LAYOUTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            result_file = Path(tmp) / "result.json"
            env = {**os.environ, "BENCH_TENSOR": str(tensor), "BENCH_PIPELINE": str(pipeline)}
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(tensor * pipeline),
                __file__,
                "--size",
                args.size,
                "--seq-len",
                str(args.seq_len),
                "--steps",
                str(args.steps),
                "--worker",
                str(result_file),
            ]
            subprocess.run(command, env=env, check=True, capture_output=True)
            result = json.loads(result_file.read_text())
        base = base or result["seconds"]
        print(f"\n{name}: {result['seconds'] * 1e3:.0f} ms/step ({base / result['seconds']:.2f}x)")
        for key, moved in sorted(result["bytes"].items()):
            print(f"  {key:<40} {moved / 2**20:9.2f} MiB/step")
        if tensor > 1:
            print(
                f"  {'analytic tensor all-reduce':<40} {expected['tensor'] / 2**20:9.2f} MiB/step"
            )
        if pipeline > 1:
            print(f"  {'analytic send (= recv)':<40} {expected['pipeline'] / 2**20:9.2f} MiB/step")


if __name__ == "__main__":
    main()
