"""A CUDA device simulated on the CPU, for catching device mix-ups without a GPU.

opd's first step on a real GPU crashed in ``torch.stack([lengths.sum(), trunc.sum(), torch.tensor(n)])``:
two CUDA scalars and one CPU scalar. The CPU test suite could not see it because every tensor there is a
CPU tensor. This module makes "a GPU" out of the CPU: `FakeCudaTensor` reports ``device == cuda:0`` and
holds an ordinary CPU tensor (``.elem``) that computes the real values, and `FakeCudaMode` (a
`TorchDispatchMode`) applies real CUDA's device rules to every ATen operator before running it on the
CPU elements. `fake_cuda()` is the context to run code under.

Device rules (what real CUDA does, as read from ATen; the error text is CUDA's):

- Factory operators (``zeros``, ``full``, ``arange``, ``empty``, ``randn``, ``torch.tensor`` ...) with
  ``device="cuda"`` give fake CUDA tensors; without a device, plain CPU tensors.
- ``.to("cuda")`` / ``.cuda()`` wrap, ``.to("cpu")`` / ``.cpu()`` / ``.tolist()`` / ``.item()`` /
  ``float(t)`` give host values; ``copy_`` between the two is allowed (host <-> device copies).
- Any other operator mixing fake CUDA and CPU tensors raises ``RuntimeError: Expected all tensors to be
  on the same device, but found at least two devices, cuda:0 and cpu!`` unless CUDA allows that mix:

  * a pointwise operator (``torch.Tag.pointwise``, TensorIterator) may read ONE 0-dim CPU tensor (a
    "CPU scalar"), never write one (``cpu_scalar += cuda_tensor`` raises); ``where`` may read several;
  * indexing (``index``, ``index_put``) may take CPU index tensors, and a non-accumulating
    ``index_put`` a 0-dim CPU value; ``masked_fill`` (mask on self's device) and ``fill_`` a 0-dim CPU
    value;
  * nothing else: ``cat`` / ``stack`` raise even for 0-dim CPU tensors (the crash above), as do
    ``matmul``, ``gather``, ``index_select``, ``embedding`` ... with any CPU tensor.

Autograd works through the wrappers (backward operators go through the same rules; gradients come back
as fake CUDA tensors), and so do `nn.Module.to("cuda")` (parameters are swapped in place, so an
optimizer built before keeps working), `copy.deepcopy` (a copied model stays on the device), `torch.save`
(saved as CPU tensors, which ``map_location="cpu"`` would give anyway) and safetensors / ``save_pretrained``
(they copy to the host first, as on a GPU).

How it is built (no part of torch is patched by `fake_cuda()` itself):

- At the C++ level the wrappers are tensors of the ``lazy`` device. A CPU-only torch registers device
  guards, which autograd needs for every tensor it records, only for cpu, meta and lazy: a C++-level
  cuda tensor makes the first recorded op abort the process ("PyTorch is not linked with support for
  cuda devices"; FakeTensorMode's fake cuda tensors hit the same). C++ code creating "a tensor like this
  one" (``self.options()`` in backward formulas and composite operators) thus asks for the lazy device,
  which the mode maps back to fake CUDA; nothing else in this project uses that device, and genuine meta
  tensors (Hugging Face builds models on meta before loading them) are left alone. Python sees
  ``t.device == cuda:0``, ``t.is_cuda``.
- A `TorchFunctionMode` rewrites CUDA device arguments (``device="cuda"``, ``.to("cuda")``,
  ``.cuda()``) to the carrier device before they reach C++, where a CPU-only build refuses them before
  any dispatch mode could see them ("Torch not compiled with CUDA enabled").
- ``torch._C._set_only_lift_cpu_tensors(True)`` while active (as FakeTensorMode does), so
  ``torch.tensor(data, device="cuda")`` is built on the host and then moved through the mode.

`cuda_runtime_stubs()` additionally replaces ``torch.cuda.get_rng_state`` / ``set_rng_state`` (used by
``torch.random.fork_rng(devices=[cuda])``) and ``torch.cuda.synchronize`` with host-side no-ops, and
``torch.cuda.Event`` with a host clock (`HostEvent`), for code that calls the CUDA runtime directly.

`count_host_transfers()` counts, while active, every device -> host transfer the simulated device sees (each
one a host synchronization on a real GPU): ``.item()`` / ``float()`` / ``int()`` / ``bool()`` (ATen's
``_local_scalar_dense``), ``.cpu()`` / ``.to("cpu")``, ``copy_`` into a host tensor, ``.tolist()``, and the
operators whose output size depends on the values (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``) or that answer a Python value
(``equal``). Tests use it to keep host syncs out of hot loops.

What it cannot tell you: anything about real kernels (dtype support such as bf16 on old GPUs, flash /
memory-efficient attention paths, cuBLAS numerics, non-determinism), memory (sizes, OOM, the caching
allocator), asynchrony (streams, events, timing, ``non_blocking`` races; `count_host_transfers` counts
the host syncs, not what they cost), NCCL / multi-GPU collectives and ``cuda:1``, CUDA graphs /
``torch.compile``, and the few ops whose CUDA kernels have their own device rules beyond those above
(they are treated conservatively: refusing the mix). C++ code that branches on ``is_cuda()`` inside composite operators takes its
non-CUDA branch (attention takes SDPA's math path); ``torch.autocast("cuda")`` is disabled by torch
(CUDA is unavailable), so autocast runs are not simulated. Random numbers come from the CPU generator, so
sampled values match a CPU run, not a GPU run. Optimizers and ``clip_grad_norm_`` take their
single-tensor path (the foreach path only accepts plain tensors). ``.to("cuda")`` of a tensor already
on the device returns a copy, where CUDA returns the tensor itself.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "CUDA",
    "FakeCudaMode",
    "FakeCudaTensor",
    "HostEvent",
    "HostTransfers",
    "count_host_transfers",
    "cuda_runtime_stubs",
    "fake_cuda",
    "host",
    "is_fake_cuda",
    "to_fake_cuda",
]

CUDA = torch.device("cuda", 0)
_CPU = torch.device("cpu")
# The C++-level device of the wrappers (see the module docstring).
_CARRIER = torch.device("lazy", 0)

aten = torch.ops.aten

# Operators that read or move data across devices by design.
_COPIES = {aten.copy_.default, aten._to_copy.default, aten.lift_fresh.default, aten.lift_fresh_copy.default}
# Indexing: CPU index tensors are moved to the indexed tensor's device by ATen (AdvancedIndex).
_INDEX = {aten.index.Tensor, aten._unsafe_index.Tensor}
_INDEX_PUT = {aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default,
              aten._unsafe_index_put.default}  # fmt: skip
# masked_fill: self and mask on one device; a 0-dim value tensor of any device is read with .item().
_MASKED_FILL = {aten.masked_fill.Tensor, aten.masked_fill_.Tensor, aten.masked_fill.Scalar,
                aten.masked_fill_.Scalar}  # fmt: skip
_FILL = {aten.fill_.Tensor, aten.fill.Tensor}  # a 0-dim value of any device, read with .item()
# `where` moves 0-dim CPU condition/self/other to the output's device itself (several allowed).
_WHERE = {aten.where.self, aten.where.self_out}


# Operators that make the host wait for the device: their output size depends on the values computed, or
# they answer a Python value (a real GPU copies the answer back before the host can go on).
_SIZE_FROM_VALUES = {
    aten.nonzero.default, aten.nonzero.out, aten.masked_select.default, aten.masked_select.out,
    aten.equal.default, aten._unique.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.bincount.default,
}  # fmt: skip


@dataclass
class HostTransfers:
    """Device -> host transfers counted by `count_host_transfers`: `ops` by kind, `where` by the line of the
    code under test that asked (the innermost frame outside torch and this module)."""

    ops: Counter[str] = field(default_factory=Counter)
    where: Counter[str] = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def record(self, kind: str) -> None:
        self.ops[kind] += 1
        self.where[_caller()] += 1

    def __str__(self) -> str:
        lines = [f"{self.count} device -> host transfers"]
        lines += [f"  {n} x {where}" for where, n in self.where.most_common()]
        return "\n".join(lines)


_COUNTERS: list[HostTransfers] = []
_HERE = str(Path(__file__).resolve())
_TORCH = str(Path(torch.__file__).resolve().parent)


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        name = str(Path(frame.filename).resolve()) if frame.filename[:1] != "<" else frame.filename
        if name != _HERE and not name.startswith(_TORCH) and "/contextlib.py" not in name:
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"


def _record_transfer(kind: str) -> None:
    for counter in _COUNTERS:
        counter.record(kind)


@contextlib.contextmanager
def count_host_transfers() -> Iterator[HostTransfers]:
    """Count the device -> host transfers of the body (see the module docstring for what counts); yields the
    `HostTransfers`, complete once the body exited. Use it under `fake_cuda()`."""
    counter = HostTransfers()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _transfer_kind(func: Any, args: tuple, kwargs: dict, fakes: list[torch.Tensor]) -> str | None:
    """What kind of device -> host transfer `func` on these arguments is, or None."""
    if func is aten._local_scalar_dense.default:
        return "item"
    if func in _SIZE_FROM_VALUES:
        return str(func.name()).removeprefix("aten::")
    if func is aten._to_copy.default and is_fake_cuda(args[0]):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cpu":
            return "to(cpu)"
    if func is aten.copy_.default and not is_fake_cuda(args[0]) and is_fake_cuda(args[1]):
        return "copy_ to host"
    if func in _INDEX or func in _INDEX_PUT:
        index = args[1] if len(args) > 1 else kwargs.get("indices")
        if any(is_fake_cuda(x) and x.dtype in (torch.bool, torch.uint8) for x in tree_flatten(index)[0]):
            return "boolean-mask index"
    return None


class FakeCudaTensor(torch.Tensor):
    """A tensor that says it lives on cuda:0 and holds its values in a CPU tensor, ``.elem``.

    Create them with `to_fake_cuda` or with ``device="cuda"`` under `fake_cuda()`; use them under it.
    """

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False) -> FakeCudaTensor:
        if type(elem) is not torch.Tensor or elem.device.type != "cpu":
            raise TypeError(
                f"FakeCudaTensor wraps a plain CPU tensor, got {type(elem).__name__} on {elem.device}"
            )
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=_CARRIER, requires_grad=requires_grad,
        )  # fmt: skip

    def __init__(self, elem: torch.Tensor, requires_grad: bool = False) -> None:
        self.elem = elem

    # What Python code sees. (C++ sees the carrier device; see the module docstring.)
    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    @property
    def is_cpu(self) -> bool:  # type: ignore[override]
        return False

    @property
    def is_meta(self) -> bool:  # type: ignore[override]
        return False

    def get_device(self) -> int:  # type: ignore[override]
        return 0

    def tolist(self) -> Any:  # type: ignore[override]
        _record_transfer("tolist")
        return self.elem.tolist()  # a device -> host copy, as on CUDA

    def numpy(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        raise TypeError(
            "can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host "
            "memory first. (simulated by tests/fake_cuda.py)"
        )

    __array__ = numpy

    # Shared-weight detection (safetensors, save_pretrained) compares storage and data pointers.
    def untyped_storage(self) -> torch.UntypedStorage:  # type: ignore[override]
        return self.elem.untyped_storage()

    def data_ptr(self) -> int:  # type: ignore[override]
        return self.elem.data_ptr()

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"FakeCudaTensor({self.elem!r}, device='cuda:0'{grad})"

    def __reduce_ex__(self, proto: Any) -> Any:  # torch.save: written as the CPU tensor
        return self.elem.detach().__reduce_ex__(proto)

    def __deepcopy__(self, memo: dict[int, Any]) -> FakeCudaTensor:
        """`copy.deepcopy` (of a tensor, a parameter or a whole model on the device, e.g. peft's merge of a
        LoRA student before saving): a new leaf on the device holding a copy of the values, with the same
        Python attributes (a parameter stays a parameter) and a copy of ``.grad``, as on CUDA.
        (torch's own `Tensor.__deepcopy__` would rebuild the wrapper from an empty 0-dim one.)"""
        import copy

        if id(self) in memo:
            return memo[id(self)]
        if not self.is_leaf:
            raise RuntimeError(
                "Only Tensors created explicitly by the user (graph leaves) support the deepcopy protocol at "
                "the moment. (simulated by tests/fake_cuda.py)"
            )
        new = FakeCudaTensor(self.elem.detach().clone(), requires_grad=self.requires_grad)
        memo[id(self)] = new
        if self.grad is not None:
            new.grad = copy.deepcopy(self.grad, memo)
        for name, value in self.__dict__.items():
            if name != "elem":
                setattr(new, name, copy.deepcopy(value, memo))
        return new

    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["elem"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], meta: Any, outer_size: Any, outer_stride: Any):
        return FakeCudaTensor(inner["elem"])

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        return _dispatch(func, args, kwargs or {})


def is_fake_cuda(t: Any) -> bool:
    return isinstance(t, FakeCudaTensor)


def _device_error(func: Any, detail: str) -> RuntimeError:
    return RuntimeError(
        "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
        f"({func}: {detail}; simulated by tests/fake_cuda.py)"
    )


def _is_gpu_device(dev: Any) -> bool:
    if dev is None:
        return False
    dev = torch.device(dev)
    return dev.type in ("cuda", _CARRIER.type)


def _written_args(func: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The tensors an operator writes to (in-place self, out=), from its schema."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
            out.extend(x for x in tree_flatten(value)[0] if isinstance(x, torch.Tensor))
    return out


def _check_mix(
    func: Any, args: tuple, kwargs: dict, fakes: list[torch.Tensor], hosts: list[torch.Tensor]
) -> None:
    """Raise as CUDA would for an operator reading fake-CUDA and CPU tensors together."""
    if func in _COPIES:
        return
    shapes = ", ".join(f"cpu{tuple(h.shape)}" for h in hosts)
    if func in _INDEX or func in _INDEX_PUT:
        self_ = args[0]
        if not is_fake_cuda(self_):
            raise RuntimeError(
                f"indices should be either on cpu or on the same device as the indexed tensor (cpu) ({func}; "
                "simulated by tests/fake_cuda.py)"
            )
        index_ids = {id(x) for x in tree_flatten(args[1])[0] if isinstance(x, torch.Tensor)}
        for h in hosts:
            if id(h) in index_ids:
                continue  # CPU indices are moved to the device by ATen
            accumulate = bool(args[3]) if len(args) > 3 else bool(kwargs.get("accumulate", False))
            if func in _INDEX_PUT and h is args[2] and h.dim() == 0 and not accumulate:
                continue
            raise _device_error(func, f"a {tuple(h.shape)} CPU value")
        return
    if func in _MASKED_FILL or func in _FILL:
        value = args[-1]
        if isinstance(value, torch.Tensor) and value.dim() != 0 and any(h is value for h in hosts):
            raise _device_error(func, f"a {tuple(value.shape)} CPU value")
        if func in _MASKED_FILL and is_fake_cuda(args[0]) != is_fake_cuda(args[1]):
            self_dev, mask_dev = ("cuda:0", "cpu") if is_fake_cuda(args[0]) else ("cpu", "cuda:0")
            raise RuntimeError(
                f"expected self and mask to be on the same device, but got mask on {mask_dev} and self on "
                f"{self_dev} ({func}; simulated by tests/fake_cuda.py)"
            )
        return
    if torch.Tag.pointwise in func.tags or func in _WHERE:
        written = {id(w) for w in _written_args(func, args, kwargs)}
        for h in hosts:
            if h.dim() != 0:
                raise _device_error(func, f"a non-scalar CPU tensor among {shapes}")
            if id(h) in written:
                raise _device_error(func, "writing into a CPU tensor")
        if len(hosts) > 1 and func not in _WHERE:
            raise RuntimeError(
                f"Trying to pass too many CPU scalars to non-CPU kernel! ({func}; simulated by tests/fake_cuda.py)"
            )
        return
    raise _device_error(func, f"CPU tensor(s) {shapes}")


def _dispatch(func: Any, args: tuple, kwargs: dict, mode: FakeCudaMode | None = None) -> Any:
    leaves = tree_flatten((args, kwargs))[0]
    fakes = [x for x in leaves if isinstance(x, FakeCudaTensor)]
    hosts = [x for x in leaves if isinstance(x, torch.Tensor) and not isinstance(x, FakeCudaTensor)]
    device = kwargs.get("device")
    to_gpu = _is_gpu_device(device)
    if not fakes and not to_gpu:
        return func(*args, **kwargs)  # nothing on the simulated GPU: an ordinary CPU (or meta) operator
    if _composite(func):
        # Composite operators arrive undecomposed where autograd is off (inference_mode): run their
        # decomposition, whose operators come back through the mode (or the tensors' own dispatch)
        # and are judged there, as CUDA judges kernels, never composites.
        with mode if mode is not None else contextlib.nullcontext():
            out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
    if _COUNTERS and fakes and (kind := _transfer_kind(func, args, kwargs, fakes)) is not None:
        _record_transfer(kind)  # after the composite branch: a composite is counted by its parts
    if fakes and hosts:
        _check_mix(func, args, kwargs, fakes, hosts)

    # Where the results live: the device asked for, else CUDA when a CUDA tensor is involved.
    on_gpu = to_gpu or (device is None and bool(fakes))
    if "device" in kwargs and to_gpu:
        kwargs = {**kwargs, "device": _CPU}
    if kwargs.get("pin_memory"):
        kwargs = {**kwargs, "pin_memory": False}

    def unwrap(x: Any) -> Any:
        return x.elem if isinstance(x, FakeCudaTensor) else x

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    # In-place / out= operators return their argument: hand back the same (outer) object.
    by_elem = {id(f.elem): f for f in fakes}
    passthrough = {id(h): h for h in hosts}

    def wrap(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or isinstance(x, FakeCudaTensor):
            return x
        if id(x) in by_elem:
            return by_elem[id(x)]
        if id(x) in passthrough:
            return passthrough[id(x)]
        if on_gpu and x.device.type == "cpu":
            return FakeCudaTensor(x)
        return x

    return tree_map(wrap, out)


class FakeCudaMode(TorchDispatchMode):
    """Applies the rules above to every ATen operator, including factories with a CUDA device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        return _dispatch(func, args, kwargs or {}, mode=self)


@functools.cache
def _composite(func: Any) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


def _cuda_name(x: Any) -> bool:
    """Whether `x` names the simulated GPU (``"cuda"``, ``"cuda:0"``, ``torch.device("cuda", 0)``)."""
    if isinstance(x, str):
        if not x.startswith("cuda"):
            return False
        x = torch.device(x)
    if not isinstance(x, torch.device) or x.type != "cuda":
        return False
    if x.index not in (None, 0):
        raise RuntimeError(f"tests/fake_cuda.py simulates one GPU (cuda:0); {x} was asked for")
    return True


class _CudaToCarrier(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to the carrier device before they reach C++.

    On a CPU-only build, C++ refuses ``device="cuda"`` before any dispatch mode can see it ("Torch not
    compiled with CUDA enabled" from the lazy CUDA initialisation; "not linked with support for cuda
    devices" when an index-less ``"cuda"`` is resolved to ``cuda:0``). The carrier device gets past both,
    and `FakeCudaMode` maps it back to fake CUDA. Strings are rewritten only where they name a device
    (``device=`` and the first argument of ``Tensor.to``), so e.g. autocast's ``"cuda"`` is left alone.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func is torch.device:  # building a device object: Python code must keep seeing "cuda"
            return func(*args, **kwargs)
        if func is torch.Tensor.cuda:
            device = args[1] if len(args) > 1 else kwargs.pop("device", None)
            if device is not None and not isinstance(device, int) and not _cuda_name(device):
                raise RuntimeError(f"Invalid device, must be cuda device (got {device})")
            if isinstance(device, int) and device != 0:
                raise RuntimeError(
                    f"tests/fake_cuda.py simulates one GPU (cuda:0); cuda:{device} was asked for"
                )
            return args[0].to(_CARRIER, **kwargs)
        if func is torch.Tensor.to or func is torch._C._nn._parse_to:
            args = tuple(
                _CARRIER if isinstance(a, (str, torch.device)) and _cuda_name(a) else a for a in args
            )
        else:
            args = tuple(_CARRIER if isinstance(a, torch.device) and _cuda_name(a) else a for a in args)
        if "device" in kwargs and _cuda_name(kwargs["device"]):
            kwargs = {**kwargs, "device": _CARRIER}
        return func(*args, **kwargs)


def _mode_active() -> bool:
    return any(isinstance(m, FakeCudaMode) for m in _get_current_dispatch_mode_stack())


@contextlib.contextmanager
def fake_cuda() -> Iterator[torch.device]:
    """Run the body on a simulated cuda:0; yields ``torch.device("cuda", 0)``.

    Nested use is a no-op. Fake tensors created inside should not be used after it exits.
    """
    if _mode_active():
        yield CUDA
        return
    lift = torch._C._only_lift_cpu_tensors()
    torch._C._set_only_lift_cpu_tensors(True)
    try:
        with _CudaToCarrier(), FakeCudaMode():
            yield CUDA
    finally:
        torch._C._set_only_lift_cpu_tensors(lift)


class HostEvent:
    """``torch.cuda.Event`` on the host: `record` reads `time.perf_counter`, `elapsed_time` gives milliseconds
    between two recorded events, `synchronize` / `wait` do nothing (nothing is queued) and `query` is True."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.enable_timing = enable_timing
        self._t: float | None = None

    def record(self, stream: Any = None) -> None:
        import time

        self._t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: HostEvent) -> float:
        if not (self.enable_timing and end.enable_timing) or self._t is None or end._t is None:
            raise RuntimeError(
                "Both events must be recorded with enable_timing=True (simulated by tests/fake_cuda.py)"
            )
        return (end._t - self._t) * 1000.0


@contextlib.contextmanager
def cuda_runtime_stubs() -> Iterator[None]:
    """Host-side no-ops for the CUDA runtime calls code may make around the simulated device:
    ``torch.cuda.get_rng_state`` / ``set_rng_state`` (``torch.random.fork_rng(devices=[cuda])`` saves
    and restores the device generator; sampling here uses the CPU generator, which fork_rng restores
    anyway), ``torch.cuda.synchronize`` (nothing is asynchronous here) and ``torch.cuda.Event`` (a host
    clock, `HostEvent`, for timers that use CUDA events where a test also makes ``torch.cuda.is_available()``
    True). ``torch.cuda.is_available()`` stays False."""
    saved = {n: getattr(torch.cuda, n) for n in ("get_rng_state", "set_rng_state", "synchronize", "Event")}
    torch.cuda.Event = HostEvent  # type: ignore[assignment,misc]
    torch.cuda.get_rng_state = lambda device="cuda": torch.zeros(0, dtype=torch.uint8)  # type: ignore[assignment]
    torch.cuda.set_rng_state = lambda new_state, device="cuda": None  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)


def to_fake_cuda(x: Any) -> Any:
    """Tensors (a leaf keeps ``requires_grad``), modules (in place: parameters and buffers are swapped,
    so references held elsewhere, e.g. by an optimizer, see the fake CUDA ones) or containers of them."""
    if isinstance(x, FakeCudaTensor):
        return x
    if isinstance(x, torch.nn.Module):
        with fake_cuda():
            return x.to(CUDA)
    if isinstance(x, torch.Tensor):
        if x.requires_grad and x.grad_fn is None:
            return FakeCudaTensor(x.detach().clone(), requires_grad=True)
        with fake_cuda():
            return x.to(CUDA)
    if isinstance(x, (list, tuple)):
        return type(x)(to_fake_cuda(v) for v in x)
    if isinstance(x, dict):
        return {k: to_fake_cuda(v) for k, v in x.items()}
    return x


def host(x: Any) -> Any:
    """The plain CPU value of a fake CUDA tensor (or of a container of them); others unchanged."""
    if isinstance(x, FakeCudaTensor):
        return x.elem.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(host(v) for v in x)
    if isinstance(x, dict):
        return {k: host(v) for k, v in x.items()}
    return x
