"""Message, the one tensor message every call sends and answers; what a node accepts (MessageLimits); a handler's
own checks of a message's tensors (TensorSpec, tensor_validator)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gwtf.errors import BadMessage

Validator = Callable[["Message"], None]

DEFAULT_DTYPES = frozenset(
    {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}
)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Message:
    """One tensor message. `sender` is stamped by the transport of the node that sent it."""

    kind: str
    run_id: str
    sender: str = ""
    iteration: int = -1
    microbatch_id: int = -1
    stage: int = -1
    tensors: list[torch.Tensor] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


@dataclass(frozen=True)
class MessageLimits:
    """What a node accepts. Frames over these are rejected before their body is buffered."""

    max_tensor_bytes: int = 1 << 30
    max_total_bytes: int = 2 << 30
    max_tensors: int = 64
    allowed_dtypes: frozenset[str] = DEFAULT_DTYPES
    max_meta_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        for name in ("max_tensor_bytes", "max_total_bytes", "max_tensors", "max_meta_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MessageLimits.{name} must be positive")
        unknown = [d for d in self.allowed_dtypes if not isinstance(getattr(torch, d, None), torch.dtype)]
        if unknown:
            raise ValueError(f"MessageLimits.allowed_dtypes: not torch dtypes: {unknown}")

    @property
    def max_header_bytes(self) -> int:
        # meta plus a generous allowance for the fixed fields and per-tensor shape entries
        return self.max_meta_bytes + 4096 + 256 * self.max_tensors


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape (None = any size on that axis) and dtype of one tensor of a message."""

    shape: tuple[int | None, ...]
    dtype: torch.dtype

    def check(self, index: int, tensor: torch.Tensor) -> None:
        if tensor.dtype != self.dtype:
            raise BadMessage(f"tensor {index}: dtype {dtype_name(tensor.dtype)}, expected {dtype_name(self.dtype)}")
        ok = tensor.dim() == len(self.shape) and all(e is None or e == s for e, s in zip(self.shape, tensor.shape))
        if not ok:
            raise BadMessage(f"tensor {index}: shape {tuple(tensor.shape)}, expected {self.shape}")


def tensor_validator(specs: Sequence[TensorSpec], stages: Sequence[int] | None = None) -> Validator:
    """A validator that checks the tensors' count, shapes and dtypes and, if given, the sender's stage."""

    def validate(msg: Message) -> None:
        if stages is not None and msg.stage not in stages:
            raise BadMessage(f"sender stage {msg.stage} not in {list(stages)}")
        if len(msg.tensors) != len(specs):
            raise BadMessage(f"{len(msg.tensors)} tensors, expected {len(specs)}")
        for i, (spec, tensor) in enumerate(zip(specs, msg.tensors)):
            spec.check(i, tensor)

    return validate
