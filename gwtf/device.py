"""Where and how a node computes: its device (`--device auto|cpu|cuda[:N]`) and the run's precision
(`train.precision = fp32 | bf16`).

Only CPU tensors reach the event loop and the transport. A node's compute thread moves a message's tensors to the
node's device (`to_device`) and hands its results back as CPU tensors (`to_host`: on CUDA through a pinned staging
buffer with a non-blocking copy and an event the thread waits on before the bytes are read). Timers synchronize the
device before reading the clock (`timed`), or they would time kernel launches only.

Precision: bf16 autocast around the forward (weights, gradients, the optimizer and averaging stay fp32, so the
master weights are exact and replicas agree whatever their device), and activations and their gradients travel in
the run's dtype (half the bytes of fp32). No fp16: its loss scaling would need coordination across stages.

`resolve_device` makes no CUDA call for `cpu`, and only reads torch.cuda for `auto` or `cuda`. (A node's DHT runs
on a thread of its process, gwtf.dht, so nothing forks a process that holds a CUDA context.)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from gwtf.errors import UserError

PRECISIONS = ("fp32", "bf16")
WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"train.precision={precision!r}: choose one of {', '.join(PRECISIONS)} (no fp16: its loss "
                        "scaling would need coordinating across stages)")  # fmt: skip
    return precision


def wire_dtype(precision: str) -> torch.dtype:
    """The dtype of activations and their gradients on the wire."""
    return WIRE_DTYPES[check_precision(precision)]


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for a bf16 run; nothing for fp32."""
    dev = torch.device(device)
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


class _OnTheWire(torch.autograd.Function):
    """Identity up to the wire's rounding, both ways: the forward rounds to the wire dtype, the backward rounds the
    gradient to it (each returns to the dtype it came in)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, wire: torch.dtype) -> torch.Tensor:
        ctx.dtype, ctx.wire = x.dtype, wire
        return x.to(wire).to(torch.float32)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.wire).to(ctx.dtype), None


def on_the_wire(x: torch.Tensor, precision: str) -> torch.Tensor:
    """`x` as the next stage receives it, as an fp32 tensor, and its gradient as the sending stage receives it: one
    process training the whole pipeline (train-local) rounds where a swarm's messages do. Nothing for fp32."""
    wire = wire_dtype(precision)
    if wire == torch.float32 and x.dtype == torch.float32:
        return x
    out: torch.Tensor = _OnTheWire.apply(x, wire)
    return out


def check_device(spec: str) -> str:
    """`spec` if it is auto, cpu, cuda or cuda:N (no CUDA call: a node checks its flags before its DHT starts)."""
    s = spec.strip().lower()
    index = s.removeprefix("cuda:") if s.startswith("cuda:") else "0"
    if s not in ("auto", "cpu", "cuda") and not s.startswith("cuda:") or not index.isdigit():
        raise UserError(f"--device {spec}: choose auto, cpu, cuda or cuda:N")
    return s


def resolve_device(spec: str) -> torch.device:
    """`auto` (the first CUDA device if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`; one clear error line
    when CUDA is asked for and absent."""
    spec = check_device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    index = int(spec.removeprefix("cuda:")) if spec.startswith("cuda:") else 0
    if not torch.cuda.is_available():
        raise UserError(f"--device {spec}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu "
                        "or install a CUDA build of torch")  # fmt: skip
    if not 0 <= index < torch.cuda.device_count():
        raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """fn(*args) and the seconds it took on `device` (synchronized before and after: CUDA runs asynchronously)."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    return out, time.perf_counter() - t0


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A received (CPU) tensor on the compute device."""
    if t.device == device:
        return t
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()  # a pageable host tensor would be staged synchronously by the driver
    return t.to(device, non_blocking=True)


def to_host(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` (detached, as `dtype`) on the CPU, for the transport. From CUDA: a non-blocking copy into pinned memory,
    and the calling thread waits on an event recorded after it before anyone reads the bytes."""
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(t.device))
    done.synchronize()
    return host


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of `module`'s parameters (the CPU for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
