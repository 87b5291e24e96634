"""The hivemind backend: calls over hivemind P2P streams, large request frames over the direct TCP path
(gwtf/transport/direct.py) whose endpoint and token are handed out through P2P."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from gwtf.auth import RunAccess
from gwtf.errors import PeerError
from gwtf.transport.base import Transport
from gwtf.transport.channels import StreamReader
from gwtf.transport.direct import HELLO, DirectTcp
from gwtf.transport.frame import encode_frame
from gwtf.transport.links import LinkEmulator
from gwtf.transport.message import Message, MessageLimits

if TYPE_CHECKING:
    from hivemind.p2p import P2P

logger = logging.getLogger(__name__)

_STREAM_IDLE_TIMEOUT = 60.0  # a P2P stream whose request stalls this long mid-frame is dropped
# Every call takes the direct TCP path by default: a P2P stream per call goes through the p2pd daemon twice, and on
# the debug swarm that cost more CPU than the model (benchmarks.throughput: 13.7k -> 19.8k tokens/s, CPU per step
# 0.49 -> 0.35 s). P2P still authenticates the caller and hands out the TCP endpoint and token (direct.HELLO).
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
        self._direct = DirectTcp(self.peer_id, self._serve_request, self._read_reply, self._ask_endpoint)

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
            self._direct.listen(tcp_host or await _p2p_ipv4(p2p))
        self.add_handler(HELLO, self._hello)
        return self

    # --- serving

    async def _on_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reader_ = StreamReader(reader, idle_timeout=_STREAM_IDLE_TIMEOUT)
            reply = await self._serve_request(info.peer_id.to_base58(), reader_)
            for buf in reply:
                writer.write(buf)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            logger.debug("%s: P2P stream from %s broke: %s", self.peer_id, info.peer_id, exc)
        finally:
            writer.close()

    async def _hello(self, msg: Message) -> Message:
        return Message("control", self.run_id, meta=self._direct.grant(msg.sender))

    # --- calling

    async def _call_frame(self, peer_id: str, frame: list[bytes | memoryview], nbytes: int) -> Message:
        if self.direct_tcp_min_bytes is not None and nbytes >= self.direct_tcp_min_bytes:
            endpoint = await self._direct.endpoint(peer_id)
            if endpoint is not None:
                return await self._direct.call(peer_id, endpoint, frame)
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
            return await self._read_reply(peer_id, StreamReader(reader))
        finally:
            writer.close()

    async def _ask_endpoint(self, peer_id: str) -> dict[str, Any]:
        hello = encode_frame(Message("control", self.run_id), extra=self._request_extra(peer_id, HELLO))
        return (await self._call_p2p(peer_id, hello)).meta

    async def shutdown(self) -> None:
        await self._direct.close()
        with contextlib.suppress(Exception):  # the daemon may already be gone; nothing left to unregister then
            await self.p2p.remove_binary_stream_handler(self._protocol)


async def _p2p_ipv4(p2p: P2P) -> str:
    for maddr in await p2p.get_visible_maddrs():
        with contextlib.suppress(Exception):
            return maddr.value_for_protocol("ip4")
    return "127.0.0.1"
