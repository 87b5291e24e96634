"""Tensor messages between nodes: one wire format, validation before use, two backends, link emulation.

A call sends one `Message` to a named handler on a peer and returns the handler's reply `Message`. On the wire a
message is a frame: a fixed prefix (magic, header length, body length), a JSON header (kind, run id, iteration,
microbatch, stage, meta, the sender's region, each tensor's dtype and shape, a crc32 of the body) and the body: the
tensors' raw bytes, each padded to `_ALIGN` bytes. Every frame a node receives is checked before a handler sees it
(run id, the sender's proof of membership in a keyed run (gwtf.auth), size limits, dtypes, checksum, finite values,
then the handler's own validator); a bad one is answered with an error and dropped, and the node keeps serving.

Backends:
    InProcessTransport  peers in one event loop (tests, simulator); frames are really encoded and decoded
    HivemindTransport   hivemind P2P streams for control and small messages; big payloads go over a direct TCP
                        connection whose endpoint and access token are handed out through P2P (libp2p streams
                        through the p2pd daemon reach ~200-250 MB/s on loopback, far below a socket)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import math
import secrets
import socket
import struct
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from gwtf.auth import RunAccess
from gwtf.errors import BadMessage, PeerError, UserError

if TYPE_CHECKING:
    from hivemind.p2p import P2P

logger = logging.getLogger(__name__)

Validator = Callable[["Message"], None]
Handler = Callable[["Message"], Awaitable["Message"]]

_MAGIC = b"GWT1"
_PREFIX = struct.Struct("!4sIQ")  # magic, header length, body length
_ALIGN = 64  # each tensor starts at a multiple of this in the body, so decoded views are aligned
_DRAIN_CHUNK = 1 << 20
_THREAD_IO_BYTES = 4 << 20  # socket transfers from this size on run in a worker thread
_THREAD_IO_TIMEOUT = 300.0  # bounds a worker thread stuck on a silent peer (callers time out much sooner)
DEFAULT_DTYPES = frozenset(
    {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}
)


@dataclass
class TransportConfig:
    """The run's transport settings (`[transport]` in a run config)."""

    call_timeout: float = 10.0  # seconds: one call to a peer

    def __post_init__(self) -> None:
        if not self.call_timeout > 0:
            raise UserError(f"transport.call_timeout={self.call_timeout} must be positive (seconds)")


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
            raise BadMessage(f"tensor {index}: dtype {_dtype_name(tensor.dtype)}, expected {_dtype_name(self.dtype)}")
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


# ---------------------------------------------------------------------------------------------------------------
# Wire format


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass
class _Header:
    """The decoded JSON header of a frame; `fields` holds the message fields, `tensors` (dtype, shape) pairs."""

    fields: dict[str, Any]
    tensors: list[tuple[str, list[int]]]
    crc: int
    body_len: int

    @property
    def handler(self) -> str:
        return str(self.fields.get("handler", ""))

    @property
    def region(self) -> str | None:
        region = self.fields.get("region")
        return region if isinstance(region, str) else None

    @property
    def error(self) -> str | None:
        error = self.fields.get("error")
        return str(error) if error is not None else None


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def encode_frame(msg: Message, *, extra: dict[str, Any]) -> list[bytes | memoryview]:
    """The frame of a message as a list of buffers (the tensors' memory is not copied)."""
    buffers: list[bytes | memoryview] = []
    crc, body_len = 0, 0
    for tensor in msg.tensors:
        data = _tensor_bytes(tensor)
        pad = bytes(_padded(data.nbytes) - data.nbytes)
        crc = zlib.crc32(pad, zlib.crc32(data, crc))
        buffers += [data, pad]
        body_len += data.nbytes + len(pad)
    header = {
        **extra,  # first, so that an error frame starts with its "error" key (see `is_error_frame`)
        "kind": msg.kind,
        "run_id": msg.run_id,
        "iteration": msg.iteration,
        "microbatch_id": msg.microbatch_id,
        "stage": msg.stage,
        "meta": msg.meta,
        "tensors": [[_dtype_name(t.dtype), list(t.shape)] for t in msg.tensors],
        "crc32": crc,
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return [_PREFIX.pack(_MAGIC, len(header_bytes), body_len), header_bytes, *buffers]


def error_frame(reason: str, run_id: str) -> list[bytes | memoryview]:
    return encode_frame(Message(kind="error", run_id=run_id), extra={"error": reason})


def is_error_frame(frame: list[bytes | memoryview]) -> bool:
    return len(frame) > 1 and isinstance(frame[1], bytes) and frame[1].startswith(b'{"error":')


def _parse_prefix(prefix: bytes, limits: MessageLimits) -> tuple[int, int]:
    magic, header_len, body_len = _PREFIX.unpack(prefix)
    if magic != _MAGIC:
        raise BadMessage("not a gwtf frame (bad magic)")
    if header_len > limits.max_header_bytes:
        raise BadMessage(f"header of {header_len} bytes exceeds {limits.max_header_bytes}")
    return header_len, body_len


def _parse_header(raw: bytes, body_len: int) -> _Header:
    """Structure only; limits and run id are checked by `_check_header`."""
    try:
        fields = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadMessage(f"header is not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise BadMessage("header is not a JSON object")
    tensors = fields.pop("tensors", [])
    crc = fields.pop("crc32", None)
    ok = isinstance(tensors, list) and all(_is_tensor_entry(t) for t in tensors) and isinstance(crc, int)
    if not ok:
        raise BadMessage("malformed tensor list or checksum in header")
    for name, kind in (("kind", str), ("run_id", str), ("iteration", int), ("microbatch_id", int), ("stage", int)):
        if not isinstance(fields.get(name), kind):
            raise BadMessage(f"header field {name!r} missing or not {kind.__name__}")
    if not isinstance(fields.get("meta"), dict):
        raise BadMessage("header field 'meta' is not an object")
    return _Header(fields, [(t[0], t[1]) for t in tensors], crc, body_len)


def _is_tensor_entry(entry: Any) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], list)
        and all(isinstance(s, int) and s >= 0 for s in entry[1])
    )


def _check_header(header: _Header, limits: MessageLimits, run_id: str) -> None:
    """Run id and size limits, before any body byte is buffered."""
    if header.fields["run_id"] != run_id:
        raise BadMessage(f"run id {header.fields['run_id']!r} is not this node's run {run_id!r}")
    if len(header.tensors) > limits.max_tensors:
        raise BadMessage(f"{len(header.tensors)} tensors exceed the limit of {limits.max_tensors}")
    meta_bytes = len(json.dumps(header.fields["meta"]))
    if meta_bytes > limits.max_meta_bytes:
        raise BadMessage(f"meta of {meta_bytes} bytes exceeds {limits.max_meta_bytes}")
    expected = 0
    for i, (dtype, shape) in enumerate(header.tensors):
        if dtype not in limits.allowed_dtypes:
            raise BadMessage(f"tensor {i}: dtype {dtype} not allowed")
        nbytes = math.prod(shape) * getattr(torch, dtype).itemsize
        if nbytes > limits.max_tensor_bytes:
            raise BadMessage(f"tensor {i}: {nbytes} bytes exceed the limit of {limits.max_tensor_bytes}")
        expected += _padded(nbytes)
    if expected > limits.max_total_bytes:
        raise BadMessage(f"message of {expected} bytes exceeds the limit of {limits.max_total_bytes}")
    if expected != header.body_len:
        raise BadMessage(f"body of {header.body_len} bytes, header describes {expected}")


def _is_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    # min/max propagate NaN and expose +-inf, at memory speed (isfinite().all() is ~20x slower on CPU)
    lo, hi = torch.aminmax(tensor)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def _decode_body(header: _Header, body: Any, sender: str) -> Message:
    """Checksum, tensors as views of `body` (which the message then owns), finite values."""
    if zlib.crc32(body) != header.crc:
        raise BadMessage("checksum mismatch")
    tensors, offset = [], 0
    for i, (dtype_name, shape) in enumerate(header.tensors):
        dtype = getattr(torch, dtype_name)
        numel = math.prod(shape)
        if numel == 0:
            tensor = torch.empty(shape, dtype=dtype)
        else:
            tensor = torch.frombuffer(body, dtype=dtype, count=numel, offset=offset).reshape(shape)
        if not _is_finite(tensor):
            raise BadMessage(f"tensor {i} has non-finite values")
        tensors.append(tensor)
        offset += _padded(numel * dtype.itemsize)
    f = header.fields
    return Message(f["kind"], f["run_id"], sender, f["iteration"], f["microbatch_id"], f["stage"], tensors, f["meta"])


# ---------------------------------------------------------------------------------------------------------------
# Byte channels: the same receive code runs over an in-memory frame, a P2P stream and a TCP socket


class _Reader(Protocol):
    async def read_exactly(self, n: int) -> bytes: ...

    async def read_into(self, buf: memoryview) -> None: ...


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = memoryview(data), 0

    async def read_exactly(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise asyncio.IncompleteReadError(bytes(self._data[self._pos :]), n)
        chunk = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return chunk

    async def read_into(self, buf: memoryview) -> None:
        buf[:] = await self.read_exactly(len(buf))


class _StreamReader:
    """`idle_timeout`: seconds without a byte before TimeoutError, so a sender that stalls mid-frame cannot hold a
    serving task forever (None: the caller's own timeout bounds the read)."""

    def __init__(self, reader: asyncio.StreamReader, idle_timeout: float | None = None) -> None:
        self._reader = reader
        self._idle = idle_timeout

    async def read_exactly(self, n: int) -> bytes:
        return await asyncio.wait_for(self._reader.readexactly(n), self._idle)

    async def read_into(self, buf: memoryview) -> None:
        pos = 0
        while pos < len(buf):
            chunk = await asyncio.wait_for(self._reader.read(min(len(buf) - pos, 1 << 22)), self._idle)
            if not chunk:
                raise asyncio.IncompleteReadError(b"", len(buf) - pos)
            buf[pos : pos + len(chunk)] = chunk
            pos += len(chunk)


class _SocketReader:
    """Reads straight into the destination buffer (no intermediate copies: matters at GB/s)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def read_exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        await self.read_into(memoryview(buf))
        return bytes(buf)

    async def read_into(self, buf: memoryview) -> None:
        if len(buf) >= _THREAD_IO_BYTES:
            await _in_thread(self._sock, _recv_exactly, buf)
            return
        loop = asyncio.get_running_loop()
        pos = 0
        while pos < len(buf):
            got = await loop.sock_recv_into(self._sock, buf[pos:])
            if got == 0:
                raise asyncio.IncompleteReadError(b"", len(buf) - pos)
            pos += got


def _recv_exactly(sock: socket.socket, buf: memoryview) -> None:
    pos = 0
    while pos < len(buf):
        got = sock.recv_into(buf[pos:])
        if got == 0:
            raise asyncio.IncompleteReadError(b"", len(buf) - pos)
        pos += got


async def _in_thread(sock: socket.socket, fn: Callable[[socket.socket, memoryview], None], buf: memoryview) -> None:
    """Big transfers run as blocking socket calls in a worker thread: they release the GIL and move megabytes per
    call, where the event loop's non-blocking path costs a loop iteration per socket-buffer's worth."""
    sock.settimeout(_THREAD_IO_TIMEOUT)
    try:
        await asyncio.to_thread(fn, sock, buf)
    finally:
        sock.setblocking(False)


async def _skip(reader: _Reader, n: int) -> None:
    scratch = memoryview(bytearray(min(n, _DRAIN_CHUNK)))
    while n > 0:
        step = min(n, len(scratch))
        await reader.read_into(scratch[:step])
        n -= step


async def _read_header(reader: _Reader, limits: MessageLimits) -> _Header:
    header_len, body_len = _parse_prefix(await reader.read_exactly(_PREFIX.size), limits)
    return _parse_header(await reader.read_exactly(header_len), body_len)


async def _read_body(reader: _Reader, header: _Header) -> Any:
    """A fresh writable buffer holding the body (a numpy array: allocated without zero-filling)."""
    body = torch.empty(header.body_len, dtype=torch.uint8).numpy()
    await reader.read_into(body.data)
    return body


# ---------------------------------------------------------------------------------------------------------------
# Link emulation


def _load_regions(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return json.loads(importlib.resources.files("gwtf.resources").joinpath("regions.json").read_text())
    return json.loads(Path(path).read_text())


class _LinkState:
    """Transfers in flight on one directed link, sharing its bandwidth equally (processor sharing)."""

    def __init__(self, bandwidth: float) -> None:
        self.bandwidth = bandwidth  # bytes per (scaled) second
        self.remaining: dict[int, float] = {}
        self.updated = time.monotonic()
        self.changed = asyncio.Event()

    def advance(self) -> None:
        now = time.monotonic()
        if self.remaining:
            share = (now - self.updated) * self.bandwidth / len(self.remaining)
            for key in self.remaining:
                self.remaining[key] -= share
        self.updated = now

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class LinkEmulator:
    """Delays deliveries by latency + bytes / bandwidth between regions; `time_scale` shrinks every delay.

    Links are symmetric as in the regions file; an intra-region link (or an unknown region) gets 1 ms and
    2048 MB/s. Transfers on one directed link that overlap in time share its bandwidth equally.
    """

    def __init__(
        self,
        regions_json: str | Path | None = None,
        time_scale: float = 1.0,
        intra_latency_ms: float = 1.0,
        intra_bandwidth_mb_per_s: float = 2048.0,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        data = _load_regions(regions_json)
        self.regions: list[str] = list(data["regions"])
        self.time_scale = time_scale
        self._intra = (intra_latency_ms / 1000, intra_bandwidth_mb_per_s * 2**20)
        self._links: dict[tuple[str, str], tuple[float, float]] = {}
        for link in data["links"]:
            cost = (link["latency_ms"] / 1000, link["bandwidth_mb_per_s"] * 2**20)
            self._links[(link["a"], link["b"])] = self._links[(link["b"], link["a"])] = cost
        self._states: dict[tuple[str | None, str | None], _LinkState] = {}
        self._next_id = 0

    def link(self, src: str | None, dst: str | None) -> tuple[float, float]:
        """(latency in seconds, bandwidth in bytes/s) of the directed link, unscaled."""
        if src is None or dst is None or src == dst:
            return self._intra
        return self._links.get((src, dst), self._intra)

    async def delay(self, src_region: str | None, dst_region: str | None, nbytes: int) -> None:
        latency, bandwidth = self.link(src_region, dst_region)
        await asyncio.sleep(latency * self.time_scale)
        if nbytes > 0:
            await self._transfer((src_region, dst_region), bandwidth / self.time_scale, nbytes)

    async def _transfer(self, key: tuple[str | None, str | None], bandwidth: float, nbytes: int) -> None:
        state = self._states.setdefault(key, _LinkState(bandwidth))
        tid, self._next_id = self._next_id, self._next_id + 1
        state.advance()
        state.remaining[tid] = float(nbytes)
        state.notify()
        try:
            while True:
                state.advance()
                left = state.remaining[tid]
                if left <= 0:
                    return
                eta = left * len(state.remaining) / state.bandwidth
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.changed.wait(), eta)
        finally:
            state.advance()
            del state.remaining[tid]
            state.notify()


# ---------------------------------------------------------------------------------------------------------------
# The interface and the receive path shared by every backend


class Transport(ABC):
    """Calls named handlers on peers with tensor messages. Subclasses move frames; this class checks them."""

    def __init__(
        self,
        peer_id: str,
        run_id: str,
        region: str | None = None,
        emulator: LinkEmulator | None = None,
        limits: MessageLimits | None = None,
        access: RunAccess | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.run_id = run_id
        self.region = region
        self.emulator = emulator
        self.limits = limits or MessageLimits()
        self.access = access or RunAccess.open(run_id)
        if self.access.run_id != run_id:
            raise ValueError(f"access is for run {self.access.run_id!r}, the transport for {run_id!r}")
        self._handlers: dict[str, tuple[Handler, Validator | None]] = {}
        self.rejected = 0  # frames refused by validation, for metrics and tests

    def add_handler(self, name: str, fn: Handler, validator: Validator | None = None) -> None:
        self._handlers[name] = (fn, validator)

    async def call(self, peer_id: str, name: str, msg: Message, timeout: float) -> Message:
        """Send `msg` to handler `name` on `peer_id` and return its reply; PeerError on any failure."""
        frame = encode_frame(msg, extra=self._request_extra(peer_id, name))
        try:
            return await asyncio.wait_for(self._call_frame(peer_id, frame, msg.nbytes), timeout)
        except TimeoutError:
            raise PeerError(f"timeout after {timeout:g}s calling {name!r} on {peer_id}") from None
        except PeerError as exc:
            raise PeerError(f"{exc} (peer {peer_id}, handler {name!r})") from None
        except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
            raise PeerError(f"unreachable: {type(exc).__name__}: {exc} (peer {peer_id}, handler {name!r})") from None

    def _request_extra(self, peer_id: str, name: str) -> dict[str, Any]:
        extra: dict[str, Any] = {"handler": name, "region": self.region}
        if self.access.keyed:
            extra["auth"] = self.access.proof(self.peer_id, peer_id)
        return extra

    @abstractmethod
    async def _call_frame(self, peer_id: str, frame: list[bytes | memoryview], nbytes: int) -> Message:
        """Deliver a request frame, read the reply frame with `_read_reply`."""

    @abstractmethod
    async def shutdown(self) -> None: ...

    async def _serve_request(self, sender: str, reader: _Reader) -> list[bytes | memoryview]:
        """Read, check and handle one request frame; returns the reply frame (an error frame if refused).

        After an error reply a connection-oriented backend closes the channel (see `is_error_frame`).
        """
        try:
            header_len, body_len = _parse_prefix(await reader.read_exactly(_PREFIX.size), self.limits)
        except BadMessage as exc:  # framing lost: the channel cannot be trusted any further
            return self._refuse(sender, "?", exc)
        try:
            header = _parse_header(await reader.read_exactly(header_len), body_len)
        except BadMessage as exc:
            await _skip(reader, body_len)
            return self._refuse(sender, "?", exc)
        try:
            _check_header(header, self.limits, self.run_id)
            self.access.check(sender, self.peer_id, header.fields.get("auth"))  # before any body byte is buffered
            entry = self._handlers.get(header.handler)
            if entry is None:
                raise BadMessage(f"no handler named {header.handler!r}")
        except BadMessage as exc:
            await _skip(reader, header.body_len)  # keeps the channel in sync; costs bandwidth, no memory
            return self._refuse(sender, header.handler, exc)
        body = await _read_body(reader, header)
        if self.emulator is not None:
            await self.emulator.delay(header.region, self.region, header.body_len)
        try:
            msg = _decode_body(header, body, sender)
            if entry[1] is not None:
                entry[1](msg)
        except BadMessage as exc:
            return self._refuse(sender, header.handler, exc)
        return await self._run_handler(header.handler, entry[0], msg)

    def _refuse(self, sender: str, handler: str, exc: BadMessage) -> list[bytes | memoryview]:
        self.rejected += 1
        logger.warning("%s: rejected a message from %s for %r: %s", self.peer_id, sender, handler, exc)
        return error_frame(f"rejected: {exc}", self.run_id)

    async def _run_handler(self, name: str, fn: Handler, msg: Message) -> list[bytes | memoryview]:
        try:
            reply = await fn(msg)
        except BadMessage as exc:  # the handler's own refusal (stale iteration, full replica): no traceback
            return self._refuse(msg.sender, name, exc)
        except Exception as exc:  # a handler bug must not take the node down; the caller learns why
            logger.exception("%s: handler %r failed on a message from %s", self.peer_id, name, msg.sender)
            return error_frame(f"handler {name!r} failed: {type(exc).__name__}: {exc}", self.run_id)
        extra: dict[str, Any] = {"region": self.region}
        if self.access.keyed:
            extra["auth"] = self.access.proof(self.peer_id, msg.sender)
        return encode_frame(reply, extra=extra)

    async def _read_reply(self, peer_id: str, reader: _Reader) -> Message:
        header = await _read_header(reader, self.limits)
        if header.error is not None:
            await _skip(reader, header.body_len)
            raise PeerError(header.error)
        try:
            _check_header(header, self.limits, self.run_id)
            self.access.check(peer_id, self.peer_id, header.fields.get("auth"))  # members take tensors from members
            body = await _read_body(reader, header)
            if self.emulator is not None:
                await self.emulator.delay(header.region, self.region, header.body_len)
            return _decode_body(header, body, peer_id)
        except BadMessage as exc:
            logger.warning("%s: bad reply from %s: %s", self.peer_id, peer_id, exc)
            raise PeerError(f"bad reply: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# In-process backend


class InProcessNetwork:
    """The peers of one event loop. `crash` makes a peer vanish: calls to it fail as unreachable."""

    def __init__(self) -> None:
        self._peers: dict[str, InProcessTransport] = {}

    def register(self, transport: InProcessTransport) -> None:
        if transport.peer_id in self._peers:
            raise ValueError(f"peer id {transport.peer_id!r} is already registered")
        self._peers[transport.peer_id] = transport

    def unregister(self, peer_id: str) -> None:
        self._peers.pop(peer_id, None)

    def crash(self, peer_id: str) -> None:
        self.unregister(peer_id)

    def get(self, peer_id: str) -> InProcessTransport | None:
        return self._peers.get(peer_id)

    @property
    def peer_ids(self) -> list[str]:
        return list(self._peers)


class InProcessTransport(Transport):
    """Delivers frames within one process; requests and replies are encoded to bytes and decoded again."""

    def __init__(
        self,
        network: InProcessNetwork,
        peer_id: str,
        run_id: str,
        region: str | None = None,
        emulator: LinkEmulator | None = None,
        limits: MessageLimits | None = None,
        access: RunAccess | None = None,
    ) -> None:
        super().__init__(peer_id, run_id, region, emulator, limits, access)
        self.network = network
        network.register(self)

    async def _call_frame(self, peer_id: str, frame: list[bytes | memoryview], nbytes: int) -> Message:
        target = self.network.get(peer_id)
        if target is None:
            raise PeerError("unreachable: no such peer")
        reply = await target._serve_request(self.peer_id, _BytesReader(b"".join(frame)))
        if self.network.get(peer_id) is not target:
            raise PeerError("unreachable: peer crashed during the call")
        return await self._read_reply(peer_id, _BytesReader(b"".join(reply)))

    async def shutdown(self) -> None:
        if self.network.get(self.peer_id) is self:
            self.network.unregister(self.peer_id)


# ---------------------------------------------------------------------------------------------------------------
# hivemind backend

_HELLO = "_gwtf.tcp_hello"  # internal handler: hands out this node's direct TCP endpoint and an access token
_TOKEN_BYTES = 16
_TCP_HANDSHAKE_TIMEOUT = 10.0
_STREAM_IDLE_TIMEOUT = 60.0  # a P2P stream whose request stalls this long mid-frame is dropped
# Every call takes the direct TCP path by default: a P2P stream per call goes through the p2pd daemon twice, and on
# the debug swarm that cost more CPU than the model (benchmarks.throughput: 13.7k -> 19.8k tokens/s, CPU per step
# 0.49 -> 0.35 s). P2P still authenticates the caller and hands out the TCP endpoint and token (_HELLO).
DEFAULT_DIRECT_TCP_MIN_BYTES = 0


class HivemindTransport(Transport):
    """Calls over hivemind P2P streams; request frames of at least `direct_tcp_min_bytes` take a direct TCP path.

    The P2P stream authenticates the caller (libp2p identity). A caller that wants the direct path first asks the
    peer, over P2P, for its TCP endpoint; the peer answers with a random token bound to the caller's peer id, and
    every TCP connection starts with that token, so the sender of a TCP frame is as trustworthy as on P2P (the
    bytes themselves are not encrypted on that path). The reply to a call returns on the channel of the request.
    """

    def __init__(
        self,
        p2p: P2P,
        run_id: str,
        region: str | None = None,
        emulator: LinkEmulator | None = None,
        limits: MessageLimits | None = None,
        direct_tcp_min_bytes: int | None = DEFAULT_DIRECT_TCP_MIN_BYTES,
        access: RunAccess | None = None,
    ) -> None:
        super().__init__(p2p.peer_id.to_base58(), run_id, region, emulator, limits, access)
        self.p2p = p2p
        self.direct_tcp_min_bytes = direct_tcp_min_bytes
        self._protocol = f"gwtf/{run_id}/call"
        self._server: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._peer_of_token: dict[bytes, str] = {}
        self._token_of_peer: dict[str, bytes] = {}
        self._endpoints: dict[str, tuple[str, int, bytes] | None] = {}  # None: that peer offers no direct path
        self._idle: dict[str, list[socket.socket]] = {}

    @classmethod
    async def create(
        cls,
        p2p: P2P,
        run_id: str,
        region: str | None = None,
        emulator: LinkEmulator | None = None,
        limits: MessageLimits | None = None,
        direct_tcp_min_bytes: int | None = DEFAULT_DIRECT_TCP_MIN_BYTES,
        tcp_host: str | None = None,
        access: RunAccess | None = None,
    ) -> HivemindTransport:
        """Register on `p2p` (which the caller owns) and, unless disabled, open the direct TCP listener on
        `tcp_host` (default: the first IPv4 address p2p listens on). `access`: who may call (default: anyone)."""
        self = cls(p2p, run_id, region, emulator, limits, direct_tcp_min_bytes, access)
        await p2p.add_binary_stream_handler(self._protocol, self._on_stream)
        if direct_tcp_min_bytes is not None:
            self._listen(tcp_host or await _p2p_ipv4(p2p))
        self.add_handler(_HELLO, self._hello)
        return self

    # --- serving

    async def _on_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reader_ = _StreamReader(reader, idle_timeout=_STREAM_IDLE_TIMEOUT)
            reply = await self._serve_request(info.peer_id.to_base58(), reader_)
            for buf in reply:
                writer.write(buf)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            logger.debug("%s: P2P stream from %s broke: %s", self.peer_id, info.peer_id, exc)
        finally:
            writer.close()

    def _listen(self, host: str) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind((host, 0))
        server.listen(64)
        server.setblocking(False)
        self._server = server
        self._spawn(self._accept_loop(server))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, server: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:  # ends when shutdown cancels it
            conn, _ = await loop.sock_accept(server)
            _tune(conn)
            self._spawn(self._serve_connection(conn))

    async def _serve_connection(self, conn: socket.socket) -> None:
        reader = _SocketReader(conn)
        try:
            token = await asyncio.wait_for(reader.read_exactly(_TOKEN_BYTES), _TCP_HANDSHAKE_TIMEOUT)
            sender = self._peer_of_token.get(token)
            if sender is None:
                logger.warning("%s: TCP connection with an unknown token refused", self.peer_id)
                return
            while True:  # one request after another until the caller closes the connection
                reply = await self._serve_request(sender, reader)
                await _sock_send(conn, reply)
                if is_error_frame(reply):
                    return
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the caller went away; nothing to answer
        finally:
            _close(conn)

    async def _hello(self, msg: Message) -> Message:
        if self._server is None:
            return Message("control", self.run_id)
        token = self._token_of_peer.get(msg.sender)
        if token is None:
            token = secrets.token_bytes(_TOKEN_BYTES)
            self._token_of_peer[msg.sender], self._peer_of_token[token] = token, msg.sender
        host, port = self._server.getsockname()[:2]
        return Message("control", self.run_id, meta={"host": host, "port": port, "token": token.hex()})

    # --- calling

    async def _call_frame(self, peer_id: str, frame: list[bytes | memoryview], nbytes: int) -> Message:
        if self.direct_tcp_min_bytes is not None and nbytes >= self.direct_tcp_min_bytes:
            endpoint = await self._endpoint(peer_id)
            if endpoint is not None:
                return await self._call_tcp(peer_id, endpoint, frame)
        return await self._call_p2p(peer_id, frame)

    async def _call_p2p(self, peer_id: str, frame: list[bytes | memoryview]) -> Message:
        from hivemind.p2p import P2PDaemonError, PeerID
        from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure

        try:
            _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), self._protocol)
        except (P2PDaemonError, ControlFailure, ValueError) as exc:
            raise PeerError(f"unreachable: {exc}") from None
        try:
            for buf in frame:
                writer.write(buf)
            await writer.drain()
            return await self._read_reply(peer_id, _StreamReader(reader))
        finally:
            writer.close()

    async def _endpoint(self, peer_id: str) -> tuple[str, int, bytes] | None:
        if peer_id not in self._endpoints:
            hello = encode_frame(Message("control", self.run_id), extra=self._request_extra(peer_id, _HELLO))
            meta = (await self._call_p2p(peer_id, hello)).meta
            ok = isinstance(meta.get("host"), str) and isinstance(meta.get("port"), int)
            self._endpoints[peer_id] = (meta["host"], meta["port"], bytes.fromhex(meta["token"])) if ok else None
        return self._endpoints[peer_id]

    async def _call_tcp(
        self, peer_id: str, endpoint: tuple[str, int, bytes], frame: list[bytes | memoryview]
    ) -> Message:
        idle = self._idle.setdefault(peer_id, [])
        sock = idle.pop() if idle else await self._connect(peer_id, endpoint)
        reusable = False
        try:
            await _sock_send(sock, frame)
            reply = await self._read_reply(peer_id, _SocketReader(sock))
            reusable = True
            return reply
        finally:
            if reusable:
                idle.append(sock)
            else:  # cancelled or failed mid-frame: the connection is out of step
                _close(sock)

    async def _connect(self, peer_id: str, endpoint: tuple[str, int, bytes]) -> socket.socket:
        host, port, token = endpoint
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            _tune(sock)
            await _sock_send(sock, [token])
        except OSError:
            sock.close()
            self._endpoints.pop(peer_id, None)  # it may have restarted elsewhere: ask again next time
            raise
        return sock

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        for socks in self._idle.values():
            for sock in socks:
                sock.close()
        self._idle.clear()
        with contextlib.suppress(Exception):  # the daemon may already be gone; nothing left to unregister then
            await self.p2p.remove_binary_stream_handler(self._protocol)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a worker thread blocked on it
    sock.close()


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _sock_send(sock: socket.socket, frame: Sequence[bytes | memoryview]) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"".join(frame[:2]))  # prefix + header in one segment
    for buf in frame[2:]:
        if len(buf) >= _THREAD_IO_BYTES:
            await _in_thread(sock, _send_all, memoryview(buf))
        elif len(buf):
            await loop.sock_sendall(sock, buf)


def _send_all(sock: socket.socket, buf: memoryview) -> None:
    sock.sendall(buf)


async def _p2p_ipv4(p2p: P2P) -> str:
    for maddr in await p2p.get_visible_maddrs():
        with contextlib.suppress(Exception):
            return maddr.value_for_protocol("ip4")
    return "127.0.0.1"
