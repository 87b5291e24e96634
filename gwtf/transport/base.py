"""Transport, the interface the nodes use (add_handler with a validator, call, shutdown, peer_id), and the receive
path every backend shares: each frame is checked before a handler sees it (run id, the sender's proof of membership
in a keyed run (gwtf.auth), size limits, dtypes, checksum, finite values, then the handler's own validator); a bad
one is answered with an error frame and dropped, and the node keeps serving. Backends only move frames. Every frame
sent or received is counted, in bytes per message kind (`wire`), for the node's telemetry."""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from gwtf.auth import RunAccess
from gwtf.errors import BadMessage, PeerError
from gwtf.transport.buffers import BufferPool
from gwtf.transport.channels import Reader
from gwtf.transport.codecs import WireCodecs
from gwtf.transport.frame import (
    PREFIX_BYTES,
    check_header,
    decode_body,
    encode_frame,
    error_frame,
    parse_header,
    read_body,
    read_prefix,
    skip,
)
from gwtf.transport.links import LinkEmulator
from gwtf.transport.message import Message, MessageLimits, Validator

logger = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[Message]]
MAX_KINDS = 64  # message kinds counted apart in `wire`; the rest count as "other"


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
        self.wire: dict[str, Counter[str]] = {"sent": Counter(), "received": Counter()}  # bytes by message kind
        self.codecs = WireCodecs()  # what each kind of message travels as (`use_wire`); none by default
        self.buffers = BufferPool()  # received bodies land in reused buffers (buffers.py); pinned by `pin_buffers`

    def use_wire(self, wire: Any) -> None:
        """Encode each kind of message as the run's WireConfig says (gwtf.transport.codecs)."""
        self.codecs.use(wire)

    def pin_buffers(self, pin: bool = True) -> None:
        """Receive into page-locked buffers (a node that computes on a CUDA device: host-to-device copies by DMA).
        A no-op where CUDA is not available."""
        self.buffers = BufferPool(self.buffers.max_idle_bytes, pin_memory=pin)

    def add_handler(self, name: str, fn: Handler, validator: Validator | None = None) -> None:
        self._handlers[name] = (fn, validator)

    async def call(self, peer_id: str, name: str, msg: Message, timeout: float) -> Message:
        """Send `msg` to handler `name` on `peer_id` and return its reply; PeerError on any failure."""
        extra = self._request_extra(peer_id, name)
        msg, extra["codecs"] = self.codecs.compress(msg, request=True)
        frame = encode_frame(msg, extra=extra, checksum=not self._authenticated_path(peer_id))
        self._count("sent", msg.kind, frame_nbytes(frame))
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

    def _authenticated_path(self, peer_id: str) -> bool:
        """Will a call to `peer_id` go over a channel that authenticates its bytes (no frame checksum needed)?"""
        return False

    @abstractmethod
    async def _call_frame(self, peer_id: str, frame: list[bytes | memoryview], nbytes: int) -> Message:
        """Deliver a request frame, read the reply frame with `_read_reply`."""

    @abstractmethod
    async def shutdown(self) -> None: ...

    async def _serve_request(self, sender: str, reader: Reader) -> list[bytes | memoryview]:
        """Read, check and handle one request frame; returns the reply frame (an error frame if refused).

        After an error reply a connection-oriented backend closes the channel (see `is_error_frame`).
        """
        try:
            header_len, body_len = await read_prefix(reader, self.limits)
        except BadMessage as exc:  # framing lost: the channel cannot be trusted any further
            return self._refuse(sender, "?", exc)
        try:
            header = parse_header(await reader.read_exactly(header_len), body_len)
        except BadMessage as exc:
            await skip(reader, body_len)
            return self._refuse(sender, "?", exc)
        self._count("received", header.fields["kind"], PREFIX_BYTES + header_len + body_len)
        try:
            check_header(header, self.limits, self.run_id)
            self.access.check(sender, self.peer_id, header.fields.get("auth"))  # before any body byte is buffered
            entry = self._handlers.get(header.handler)
            if entry is None:
                raise BadMessage(f"no handler named {header.handler!r}")
        except BadMessage as exc:
            await skip(reader, header.body_len)  # keeps the channel in sync; costs bandwidth, no memory
            return self._refuse(sender, header.handler, exc)
        body = await read_body(reader, header, self.buffers)
        if self.emulator is not None:
            await self.emulator.delay(header.region, self.region, header.body_len)
        try:
            msg = decode_body(header, body, sender, reader.authenticated)
            msg = self.codecs.decompress(msg, header.fields.get("codecs"), self.limits)
            if entry[1] is not None:
                entry[1](msg)
        except BadMessage as exc:
            return self._refuse(sender, header.handler, exc)
        return await self._run_handler(header.handler, entry[0], msg, reader.authenticated)

    def _refuse(self, sender: str, handler: str, exc: BadMessage) -> list[bytes | memoryview]:
        self.rejected += 1
        logger.warning("%s: rejected a message from %s for %r: %s", self.peer_id, sender, handler, exc)
        return self._sent(error_frame(f"rejected: {exc}", self.run_id), "error")

    async def _run_handler(
        self, name: str, fn: Handler, msg: Message, authenticated: bool = False
    ) -> list[bytes | memoryview]:
        try:
            reply = await fn(msg)
        except BadMessage as exc:  # the handler's own refusal (stale iteration, full replica): no traceback
            return self._refuse(msg.sender, name, exc)
        except Exception as exc:  # a handler bug must not take the node down; the caller learns why
            logger.exception("%s: handler %r failed on a message from %s", self.peer_id, name, msg.sender)
            return self._sent(
                error_frame(f"handler {name!r} failed: {type(exc).__name__}: {exc}", self.run_id), "error"
            )
        extra: dict[str, Any] = {"region": self.region}
        if self.access.keyed:
            extra["auth"] = self.access.proof(self.peer_id, msg.sender)
        reply, extra["codecs"] = self.codecs.compress(reply, request=False)
        return self._sent(encode_frame(reply, extra=extra, checksum=not authenticated), reply.kind)

    def _sent(self, frame: list[bytes | memoryview], kind: str) -> list[bytes | memoryview]:
        self._count("sent", kind, frame_nbytes(frame))
        return frame

    def _count(self, direction: str, kind: str, nbytes: int) -> None:
        counts = self.wire[direction]
        if kind not in counts and len(counts) >= MAX_KINDS:  # kinds come from peers too: bounded
            kind = "other"
        counts[kind] += nbytes

    async def _read_reply(self, peer_id: str, reader: Reader) -> Message:
        header_len, body_len = await read_prefix(reader, self.limits)
        header = parse_header(await reader.read_exactly(header_len), body_len)
        self._count("received", header.fields["kind"], PREFIX_BYTES + header_len + body_len)
        if header.error is not None:
            await skip(reader, header.body_len)
            raise PeerError(header.error)
        try:
            check_header(header, self.limits, self.run_id)
            self.access.check(peer_id, self.peer_id, header.fields.get("auth"))  # members take tensors from members
            body = await read_body(reader, header, self.buffers)
            if self.emulator is not None:
                await self.emulator.delay(header.region, self.region, header.body_len)
            msg = decode_body(header, body, peer_id, reader.authenticated)
            return self.codecs.decompress(msg, header.fields.get("codecs"), self.limits)
        except BadMessage as exc:
            logger.warning("%s: bad reply from %s: %s", self.peer_id, peer_id, exc)
            raise PeerError(f"bad reply: {exc}") from None


def frame_nbytes(frame: list[bytes | memoryview]) -> int:
    return sum(part.nbytes if isinstance(part, memoryview) else len(part) for part in frame)
