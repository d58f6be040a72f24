"""Every parallel layout computes what one process computes (float32, gloo).

For tensor 2, pipeline 2, tensor 2 x pipeline 2 and tensor 2 x data 2: every parameter's
gradient at steps 1 and 3 and the losses of 6 steps, against one process. Tensor
parallelism splits each objective's loss over the vocabulary, so tensor 2 trains every
objective, and MDLM once more with dropout (it acts on activations replicated over the
tensor group: every tensor rank must draw the masks one process draws). The other layouts
do not depend on the objective and each train one, together covering all three. Gradients
are read where autograd leaves them on each rank (after the last micro-batch's backward,
before DeepSpeed's step), tensor shards are gathered along megatron's partition_dim and data
ranks averaged, as DeepSpeed's reduction does. (Data parallel alone, through the launcher:
tests/test_train.py.)

Data: one process with two loader workers reads the same two streams, into the same rows of
the global batch, as two data ranks with one worker each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from dlm_pretrain.pretrain import trainer
from dlm_pretrain.pretrain.config import load_config
from dlm_pretrain.pretrain.objectives import OBJECTIVES

pytestmark = pytest.mark.slow  # several processes or whole runs: not in the quick subset

STEPS = 6
# adaLN-Zero: the head and every gate start at zero, so step 1 has non-zero gradients only in
# the head, step 2 also in the modulations, and step 3 in every parameter.
GRADIENT_STEPS = (1, 3)
SETTINGS = [
    "model.size=tiny",
    "train.global_batch=16",
    "train.micro_batch=8",
    f"train.steps={STEPS}",
    "optim.min_warmup_steps=3",
    "optim.lr=3e-3",
]
# name -> its overrides: each objective (Eso-LM with both branches: diffusion rows and the
# sequential rows' 2L-token pairs), and MDLM with dropout
TRAININGS = {name: [f"objective.name={name}"] for name in OBJECTIVES if name != "esolm"}
TRAININGS["esolm-split"] = [
    "objective.name=esolm",
    "objective.alpha_0=0.5",
    "objective.batch_split=0.5",
]
TRAININGS["mdlm-dropout"] = ["objective.name=mdlm", "model.dropout=0.2"]
# Every training runs under tensor parallelism once: in tp2 alone, or in tp2xpp2 / tp2xdp2.
LAYOUTS = {  # name -> (processes, data-parallel size, overrides, trainings)
    "tp2": (2, 1, ["parallel.tensor=2"], ("duo", "mdlm-dropout")),
    # the time input (Duo, GIDD) and Eso-LM's positions cross the stages
    "pp2": (2, 1, ["parallel.pipeline=2"], ("duo", "gidd", "esolm-split")),
    "tp2xpp2": (
        4,
        1,
        ["parallel.tensor=2", "parallel.pipeline=2"],
        ("mdlm", "gidd", "esolm-split"),
    ),
    "tp2xdp2": (4, 2, ["parallel.tensor=2"], ("ar", "gidd", "esolm-split")),
}


def _capture_gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> the gradient after the latest accumulation into it (a copy)."""
    grads = {}
    for name, p in module.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: grads.__setitem__(name, p.grad.detach().clone())
        )
    return grads


def _full_gradient(p: torch.nn.Parameter, grad: torch.Tensor, groups) -> torch.Tensor:
    if getattr(p, "tensor_model_parallel", False):  # gather the shards
        parts = [torch.empty_like(grad) for _ in range(groups.tp_size)]
        dist.all_gather(parts, grad.contiguous(), group=groups.tp_group)
        grad = torch.cat(parts, p.partition_dim)
    dist.all_reduce(grad, group=groups.dp_group)
    return grad / groups.dp_size


def _train_each(
    rank: int, world: int, dataset: Path, out: Path, dp: int, extra: list, names=tuple(TRAININGS)
) -> None:
    torch.set_num_threads(1)  # several processes share 2 cores
    workers = 2 // dp  # two reader streams in every layout
    for name in names:
        run_dir = out / name
        cfg = load_config(
            "default",
            [
                f"data.path={dataset}",
                f"train.run_dir={run_dir}",
                *TRAININGS[name],
                f"data.num_workers={workers}",
                *SETTINGS,
                *extra,
            ],
        )
        r, _ = trainer._setup(cfg)
        module = r.engine.module
        grads = _capture_gradients(module)
        batches = trainer._noised_micro_batches(
            iter(r.loader), cfg, r.objective, r.vocab, r.groups, 0, r.runtime.device
        )
        params, losses, result = dict(module.named_parameters()), [], {}
        for step in range(1, STEPS + 1):
            losses.append(r.engine.train_batch(data_iter=batches).item())
            if step in GRADIENT_STEPS:
                result.update(
                    {(step, n): _full_gradient(params[n], g, r.groups) for n, g in grads.items()}
                )
        if r.groups.tp_rank == 0 and r.groups.dp_rank == 0:
            torch.save(result, run_dir / f"grads-stage{r.groups.pp_rank}.pt")
            (run_dir / "losses.json").write_text(json.dumps(losses))
        r.tracker.close()


def _read(out: Path, name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    grads = {}
    for stage in sorted((out / name).glob("grads-stage*.pt")):
        grads.update(torch.load(stage))
    return json.loads((out / name / "losses.json").read_text()), grads


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_process")
    run_distributed(_train_each, 1, dataset, out, 1, [])
    return out


def _assert_same_training(reference: Path, out: Path, names: tuple[str, ...]) -> None:
    for name in names:
        ref_losses, ref_grads = _read(reference, name)
        losses, grads = _read(out, name)
        assert len(losses) == STEPS
        for ref, got in zip(ref_losses, losses, strict=True):
            assert abs(got - ref) <= 1e-5 * abs(ref), (name, ref_losses, losses)
        assert grads.keys() == ref_grads.keys(), name
        for key, ref in ref_grads.items():
            err = (grads[key] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
            assert err < 1e-5, (name, key, err.item())
            if key[0] == 3:  # a parameter the loss does not reach would compare 0 with 0
                assert ref.abs().max() > 0, (name, key)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_one_process(dataset, tmp_path, one_process, layout):
    processes, dp, extra, names = LAYOUTS[layout]
    run_distributed(_train_each, processes, dataset, tmp_path, dp, extra, names)
    _assert_same_training(one_process, tmp_path, names)


def test_dropout_changes_the_training(one_process):
    """The dropout training of the tensor 2 layout is not the plain one."""
    assert _read(one_process, "mdlm-dropout")[0] != _read(one_process, "mdlm")[0]


def test_every_training_runs_under_tensor_parallelism():
    """The layouts split the trainings between them; none may fall through."""
    under_tensor = {
        n for _, _, extra, names in LAYOUTS.values() if "parallel.tensor=2" in extra for n in names
    }
    assert under_tensor == set(TRAININGS)
