"""A fake accelerator: tensors that hold CPU data but live on another device, so that the
GPU path's device placement runs, and is checked, on a machine without a GPU.

`DeviceTensor` wraps a CPU tensor and reports the device `lazy:0` (the one non-CPU device
type the CPU build of torch can host without a C++ extension: it has a device guard, and
`is_meta`/`is_cuda` stay false). Every aten op on it runs on the wrapped CPU tensors, after
the checks a GPU would make or that we want:

- a CPU tensor (other than a 0-dim scalar) meeting a device tensor raises, as CUDA does;
- a CPU tensor handed to a collective of a device process group raises, as NCCL does;
- every host-to-device copy, device-to-host copy (`.item()`, `.cpu()`, `.tolist()`) and
  data-dependent shape (`nonzero`: a sync on CUDA) is recorded with the innermost frame of
  our code that asked for it, so a test can require that a region makes none but the
  expected ones.

`fake_accelerator()` also makes DeepSpeed place engines on that device and torch.autocast
accept it (as CPU autocast). What it cannot show: CUDA streams and asynchrony, NCCL itself,
compiled Triton kernels, memory, speed.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("lazy", 0)
BACKEND = "cpu:gloo,lazy:gloo"  # collectives on device tensors go through gloo
REPO = Path(__file__).resolve().parents[1]
aten = torch.ops.aten
_INDEX_OPS = (
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
)
_SHAPE_SYNCS = ("aten.nonzero", "aten.masked_select", "aten._unique", "aten.unique")


@dataclass(frozen=True)
class Transfer:
    kind: str  # "h2d", "d2h" or "sync" (an op whose output shape depends on device data)
    op: str
    where: str  # "path/file.py:function" of the innermost frame of our code, or "third-party"


@dataclass
class Transfers:
    """What crossed between host and device while recording."""

    events: list[Transfer] = field(default_factory=list)
    recording: bool = True

    def ours(self) -> list[Transfer]:
        return [e for e in self.events if e.where != "third-party"]


_LOG = Transfers(recording=False)


def _caller() -> str:
    """Who asked: the innermost frame of our code, unless a third-party package (DeepSpeed,
    megatron-core) is nearer; torch's own frames and this harness are skipped."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path == Path(__file__).resolve():
            continue
        if "site-packages" in path.parts:
            package = path.parts[path.parts.index("site-packages") + 1]
            if package == "torch":
                continue
            return "third-party"
        if REPO in path.parents:
            return f"{path.relative_to(REPO)}:{frame.name}"
    return "third-party"


def _record(kind: str, op: object) -> None:
    if _LOG.recording:
        _LOG.events.append(Transfer(kind, str(op), _caller()))


class DeviceTensor(torch.Tensor):
    """A CPU tensor seen as a `lazy:0` tensor (no __tensor_flatten__: moving a module replaces
    its parameters, as a real host-to-GPU move does)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool | None = None) -> DeviceTensor:
        grad = elem.requires_grad if requires_grad is None else requires_grad
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=DEVICE,
            requires_grad=grad,
        )
        wrapper.elem = elem
        return wrapper

    def tolist(self) -> list:
        _record("d2h", "Tensor.tolist")
        return self.elem.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError(f"can't convert {self.device} device type tensor to numpy")

    def __reduce_ex__(self, protocol):  # checkpoints hold host tensors, as map_location="cpu"
        return self.elem.__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _on_device(device: object) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


def _check_collective(func, flat: list) -> None:
    boxed = [a for a in flat if isinstance(a, torch.ScriptObject)]
    groups = [dist.ProcessGroup.unbox(a) for a in boxed if "ProcessGroup" in str(a._type())]
    if any(DEVICE.type in [d.type for d in g._device_types] for g in groups):
        for a in flat:
            if type(a) is torch.Tensor and a.device.type == "cpu":
                raise RuntimeError(f"CPU tensor passed to {func} on a device process group")


def _check_and_record(func, args, kwargs, flat: list) -> None:
    if func.namespace == "c10d" and func is not torch.ops.c10d.barrier.default:
        _check_collective(func, flat)  # (a barrier sends a host tensor of its own)
    on_device = any(isinstance(a, DeviceTensor) for a in flat)
    if on_device and func not in (aten.copy_.default, aten._to_copy.default):
        for a in flat:
            if type(a) is torch.Tensor and a.device.type == "cpu" and a.dim() > 0:
                if func in _INDEX_OPS and any(a is i for i in args[1] if i is not None):
                    _record("h2d", func)  # CUDA copies a host index tensor over, silently
                    continue
                raise RuntimeError(
                    f"Expected all tensors to be on the same device, but found at least two "
                    f"devices, {DEVICE} and cpu! ({func})"
                )
    if func is aten._local_scalar_dense.default and on_device:
        _record("d2h", func)  # .item(), bool(t), int(t)
    elif func is aten._to_copy.default:
        source_on_device = isinstance(args[0], DeviceTensor)
        target = kwargs.get("device")
        if source_on_device and target is not None and torch.device(target).type == "cpu":
            _record("d2h", func)
        elif not source_on_device and _on_device(target):
            _record("h2d", func)
    elif func is aten.copy_.default and isinstance(args[0], DeviceTensor) != isinstance(
        args[1], DeviceTensor
    ):
        _record("h2d" if isinstance(args[0], DeviceTensor) else "d2h", func)
    elif str(func).startswith(_SHAPE_SYNCS) and on_device:
        _record("sync", func)


def _run(func, args: tuple, kwargs: dict):
    flat, _ = tree_flatten((args, kwargs))
    _check_and_record(func, args, kwargs, flat)
    on_device = any(isinstance(a, DeviceTensor) for a in flat)
    target = kwargs.get("device")

    def unwrap(x):
        if isinstance(x, DeviceTensor):
            return x.elem
        return torch.device("cpu") if isinstance(x, torch.device) and _on_device(x) else x

    with _disable_current_modes():
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    if func is aten._local_scalar_dense.default:
        return out
    wrap = _on_device(target) if target is not None else on_device
    if not wrap:
        return out
    schema = func._schema
    if schema.returns and schema.returns[0].alias_info and schema.returns[0].alias_info.is_write:
        return args[0]  # in-place: the same wrapper
    return tree_map(lambda x: DeviceTensor(x) if type(x) is torch.Tensor else x, out)


class _Factories(TorchDispatchMode):
    """Ops with no device tensor among their inputs (torch.zeros(device=...))."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t not in (DeviceTensor, torch.Tensor, torch.nn.Parameter) for t in types):
            return NotImplemented
        return _run(func, args, kwargs or {})


def _indexed(device: object) -> object:
    """`lazy` -> `lazy:0`: moving to a device without an index needs a CUDA-style guard."""
    if isinstance(device, str) and device == DEVICE.type:
        return DEVICE
    if isinstance(device, torch.device) and device == torch.device(DEVICE.type):
        return DEVICE
    return device


def _sets_data(func) -> bool:
    """`tensor.data = other` (a bound setter of the `data` descriptor)."""
    return getattr(func, "__self__", None) is torch._C.TensorBase.data and (
        func.__name__ == "__set__"
    )


class _PythonLevel(TorchFunctionMode):
    """What bypasses the dispatcher: torch.tensor(data, device=...) and list indices."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _sets_data(func) and isinstance(args[0], DeviceTensor):
            target, value = args  # DeepSpeed points parameters into its flat buffers
            with torch._C.DisableTorchFunction():
                func(target, value)
            target.elem = value.elem
            return None
        if func in (torch.tensor, torch.as_tensor) and _on_device(kwargs.get("device")):
            kwargs.pop("device")
            if isinstance(args[0], DeviceTensor):
                return args[0]
            with torch._C.DisableTorchFunction():
                host = func(*args, **kwargs)
            _record("h2d", func.__name__)
            return DeviceTensor(host.detach(), requires_grad=host.requires_grad)
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(
            args[0], DeviceTensor
        ):
            index = args[1]
            as_tensor = lambda i: torch.tensor(i) if isinstance(i, list) else i  # noqa: E731
            index = tuple(map(as_tensor, index)) if isinstance(index, tuple) else as_tensor(index)
            args = (args[0], index, *args[2:])
        if func is not torch.device:
            args = tuple(_indexed(a) for a in args)
            kwargs = {k: _indexed(v) if k == "device" else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


class _Autocast(torch.autocast):
    """torch.autocast with the fake device taken as the CPU."""

    def __init__(self, device_type: str, *args, **kwargs) -> None:
        super().__init__("cpu" if device_type == DEVICE.type else device_type, *args, **kwargs)


def _accelerator():
    """DeepSpeed's CPU accelerator, placing engines on the fake device."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    class FakeAccelerator(CPU_Accelerator):
        def __init__(self) -> None:
            super().__init__()
            self._communication_backend_name = BACKEND

        def device_name(self, device_index=None) -> str:
            return DEVICE.type if device_index is None else f"{DEVICE.type}:{device_index}"

        def current_device_name(self) -> str:
            return str(DEVICE)

        def device(self, device_index=None) -> torch.device:
            return DEVICE

        def on_accelerator(self, tensor: torch.Tensor) -> bool:
            return tensor.device.type == DEVICE.type

    return FakeAccelerator()


@contextlib.contextmanager
def fake_accelerator() -> Iterator[Transfers]:
    """The fake device for the code inside; yields the (already recording) transfer log."""
    from deepspeed import accelerator

    saved = (
        accelerator.get_accelerator(),
        torch.autocast,
        torch.is_autocast_enabled,
        torch.get_autocast_dtype,
    )
    cpu = lambda device_type: "cpu" if device_type == DEVICE.type else device_type  # noqa: E731
    torch.autocast = _Autocast
    torch.is_autocast_enabled = lambda device_type=None: saved[2](cpu(device_type or "cuda"))
    torch.get_autocast_dtype = lambda device_type: saved[3](cpu(device_type))
    accelerator.set_accelerator(_accelerator())
    global _LOG
    _LOG = Transfers()
    try:
        with _PythonLevel(), _Factories():
            yield _LOG
    finally:
        _LOG = Transfers(recording=False)
        accelerator.set_accelerator(saved[0])
        torch.autocast, torch.is_autocast_enabled, torch.get_autocast_dtype = saved[1:]
