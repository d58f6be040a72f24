"""The GPU path's device placement, checked on a fake accelerator (tests/fake_device.py):
the model, the data and every tensor of a step live on a device that is not the CPU, where
a CPU tensor meeting a device tensor raises (as on CUDA) and every transfer between host and
device is recorded with the function of ours that asked for it.

A whole run (training, validation, samples, checkpoints, resume) on that device equals the
CPU run to float32 rounding (1e-6: since the head and the loss are fused, one step in six
differs in the last bit, a reduction rounding differently under the fake device's dispatch;
the fused path alone is bitwise equal there) and transfers only where this file allows it;
through DeepSpeed's 1F1B schedule on two pipeline stages, a training step copies nothing but
its micro-batches.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from distributed import run_distributed
from dlm_pretrain.parallel.groups import Runtime
from dlm_pretrain.pretrain import trainer
from dlm_pretrain.pretrain.config import load_config
from fake_device import BACKEND, DEVICE, fake_accelerator
from test_train import _losses, _overrides

pytestmark = pytest.mark.slow  # several processes or whole runs: not in the quick subset

FAKE = Runtime(DEVICE, torch.float32, BACKEND)

# Every transfer our code may make in a run, each one deliberate (a "host sync" comment
# marks it in the code): (kind, function).
ALLOWED = {
    ("h2d", "data_pipeline/reader.py:<genexpr>"),  # Batch.to: the micro-batch, once
    ("h2d", "pretrain/objectives/vocab.py:to"),  # the real-id mask and ids, once per run
    ("h2d", "pretrain/objectives/draws.py:host_uniform"),  # the samplers' float64 uniforms
    ("d2h", "pretrain/trainer.py:run"),  # the step's loss, once per step
    ("d2h", "pretrain/trainer.py:_grad_norm"),  # DeepSpeed's norm, once per step
    ("d2h", "pretrain/trainer.py:agreed"),  # the stop flag, once per step
    ("d2h", "pretrain/trainer.py:validate"),  # the validation loss, once per validation
    ("d2h", "pretrain/trainer.py:<genexpr>"),  # samples to text
    ("d2h", "pretrain/objectives/mdlm.py:sample"),  # "anything left to reveal?", per step
    ("sync", "pretrain/objectives/mdlm.py:sample"),  # the masked positions' x̂, per forward
    ("sync", "pretrain/objectives/mdlm.py:head_terms"),  # the masked tokens' count
}


def _config(dataset: Path, run_dir: Path, *extra: str):
    return load_config("default", _overrides(dataset, run_dir, "data.num_workers=0", *extra))


def test_a_run_on_the_device_equals_the_cpu_run_and_transfers_only_where_allowed(dataset, tmp_path):
    extra = ("train.val_every=2", "train.checkpoint_every=2")
    cfg = _config(dataset, tmp_path / "cpu", "train.steps=6", *extra)
    trainer.run(cfg)
    with fake_accelerator() as transfers:
        for steps in (4, 6):  # then resumed from the step-4 checkpoint
            cfg = _config(dataset, tmp_path / "device", f"train.steps={steps}", *extra)
            trainer.run(cfg, FAKE)
    device, cpu = _losses(tmp_path / "device"), _losses(tmp_path / "cpu")
    assert device.keys() == cpu.keys()
    assert all(abs(device[k] - cpu[k]) <= 1e-6 * abs(cpu[k]) for k in cpu), (device, cpu)
    made = Counter((t.kind, t.where) for t in transfers.ours())
    assert set(made) <= ALLOWED, set(made) - ALLOWED
    assert made["d2h", "pretrain/trainer.py:run"] == 6


def test_a_device_tensor_meeting_a_cpu_tensor_raises():
    """The harness itself: what CUDA refuses, it refuses; what CUDA copies, it records."""
    with fake_accelerator() as transfers:
        x = torch.ones(3, device=DEVICE)
        try:
            x + torch.ones(3)
        except RuntimeError as e:
            assert "Expected all tensors to be on the same device" in str(e)
        else:
            raise AssertionError("a CPU tensor met a device tensor silently")
        assert (x + torch.tensor(2.0)).device == DEVICE  # a 0-dim host scalar is fine
        x.sum().item()
        torch.arange(3).to(DEVICE)
    assert [t.kind for t in transfers.ours()] == ["d2h", "h2d"]


def _pipeline_steps(rank: int, world_size: int, dataset: Path, run_dir: Path) -> None:
    torch.set_num_threads(1)
    with fake_accelerator() as transfers:
        cfg = _config(dataset, run_dir, "train.steps=3", "parallel.pipeline=2")
        r, _ = trainer._setup(cfg, FAKE)
        batches = trainer._noised_micro_batches(
            iter(r.loader), cfg, r.objective, r.vocab, r.groups, 0, FAKE.device
        )
        assert all(p.device == DEVICE for p in r.engine.module.parameters())
        transfers.events.clear()
        losses = [r.engine.train_batch(data_iter=batches) for _ in range(3)]
        made = Counter((t.kind, t.where) for t in transfers.ours())
        r.tracker.close()
    micro_batches = 3 * cfg.train.accumulation_steps(1)
    # each stage reads the micro-batches (3 tensors each) and copies nothing else; the last
    # stage also counts MDLM's masked tokens (a sync)
    expected = {("h2d", "data_pipeline/reader.py:<genexpr>"): 3 * micro_batches}
    if r.groups.pp_rank == 1:
        expected["sync", "pretrain/objectives/mdlm.py:head_terms"] = micro_batches
        assert all(loss.device == DEVICE for loss in losses)
    assert made == expected, (r.groups.pp_rank, made)


def test_pipeline_steps_on_the_device_copy_nothing_but_the_micro_batches(dataset, tmp_path):
    run_distributed(_pipeline_steps, 2, dataset, tmp_path / "pp2", backend=BACKEND)
