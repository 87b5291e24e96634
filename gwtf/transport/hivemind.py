"""The hivemind backend: calls over hivemind P2P streams, large request frames over the direct TCP path
(gwtf/transport/direct.py) whose endpoint and connection secret are handed out through P2P; a peer whose direct
path cannot be reached is called over P2P (through a circuit relay if libp2p needs one)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from gwtf.auth import RunAccess
from gwtf.errors import PeerError, UserError
from gwtf.transport.base import Transport
from gwtf.transport.channels import StreamReader
from gwtf.transport.direct import HELLO, REACH, DirectTcp, DirectUnreachable
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

    The P2P stream authenticates the caller (libp2p identity) and encrypts. A caller that wants the direct path
    first asks the peer, over P2P, for its TCP endpoint; the peer answers with its addresses, a handle and a secret
    bound to the caller's peer id, from which both ends key each TCP connection (direct.py, crypto.py), so the
    sender of a TCP frame is as trustworthy as on P2P and its bytes are sealed (unless `encrypt` is off). The reply
    to a call returns on the channel of the request.
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
        encrypt: bool = True,
    ) -> None:
        super().__init__(p2p.peer_id.to_base58(), run_id, region, emulator, limits, access)
        self.p2p = p2p
        self.direct_tcp_min_bytes = direct_tcp_min_bytes
        self._protocol = f"gwtf/{run_id}/call"
        self._direct = DirectTcp(self.peer_id, self._serve_request, self._read_reply, self._ask_endpoint,
                                 run_id, self.access.key, encrypt)  # fmt: skip

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
        announce_hosts: list[str] | None = None,
        encrypt: bool = True,
        tcp_port: int = 0,
    ) -> HivemindTransport:
        """Register on `p2p` (which the caller owns) and, unless disabled, open the direct TCP listener.

        `tcp_host`: where it listens (the IPv4 address of `--host-maddrs`; "0.0.0.0" for every interface; default:
        the first IPv4 address p2p announces); `announce_hosts`: the addresses peers dial (those of
        `--announce-maddrs`; default: `tcp_host`, or this machine's addresses that p2p announces if it listens on
        every interface); `tcp_port`: its port (0: any free one). `access`: who may call (default: anyone).
        `encrypt`: seal the direct path's frames."""
        self = cls(p2p, run_id, region, emulator, limits, direct_tcp_min_bytes, access, encrypt)
        await p2p.add_binary_stream_handler(self._protocol, self._on_stream)
        if direct_tcp_min_bytes is not None:
            await self._listen_direct(tcp_host, announce_hosts, tcp_port)
        self.add_handler(HELLO, self._hello)
        self.add_handler(REACH, self._reach)
        return self

    async def _listen_direct(self, host: str | None, announce: list[str] | None, port: int) -> None:
        visible = await _p2p_ipv4s(self.p2p)
        host = host or next(iter(visible), None)
        if host is None:  # never guess 127.0.0.1: peers on other machines would dial themselves
            logger.warning(
                "%s: p2p announces no IPv4 address, so the direct TCP path is off; peers call this node over "
                "libp2p streams (pass --host-maddrs /ip4/ADDR/tcp/PORT to listen for it)", self.peer_id
            )  # fmt: skip
            return
        if not announce and host == "0.0.0.0":
            announce = [h for h in visible if h != "0.0.0.0"]
            announce = [h for h in announce if not h.startswith("127.")] or announce  # others' loopback is theirs
        try:
            self._direct.listen(host, announce or None, port)
        except OSError as exc:
            raise UserError(f"cannot listen for the direct TCP path on {host}:{port}: {exc}") from None
        logger.info("%s: direct TCP path on %s:%s, announced as %s", self.peer_id, host, self._direct.port,
                    self._direct.announce)  # fmt: skip

    @property
    def direct_endpoint(self) -> tuple[list[str], int] | None:
        """The addresses and port this node's direct path announces (None: no direct path)."""
        port = self._direct.port
        return (list(self._direct.announce), port) if port is not None else None

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

    async def _reach(self, msg: Message) -> Message:
        return Message("control", self.run_id, meta=await self._direct.dial_back(msg.sender))

    async def reachable_from(self, peer_id: str, timeout: float) -> dict[str, str]:
        """Ask `peer_id` to open a direct TCP connection back to this node (`gwtf doctor`)."""
        return (await self.call(peer_id, REACH, Message("control", self.run_id), timeout)).meta

    # --- calling

    def _authenticated_path(self, peer_id: str) -> bool:
        # libp2p streams are, and so is the direct path unless the peer runs it plain; a peer not asked yet: checksum
        return self.direct_tcp_min_bytes is None or self._direct.sealed_to(peer_id)

    async def _call_frame(self, peer_id: str, frame: list[bytes | memoryview], nbytes: int) -> Message:
        if self.direct_tcp_min_bytes is not None and nbytes >= self.direct_tcp_min_bytes:
            endpoint = await self._direct.endpoint(peer_id)
            if endpoint is not None:
                with contextlib.suppress(DirectUnreachable):  # said once by DirectTcp; nothing was sent
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


async def _p2p_ipv4s(p2p: P2P) -> list[str]:
    """The IPv4 addresses in the multiaddresses p2p announces, in its order, without repeats."""
    hosts: list[str] = []
    for maddr in await p2p.get_visible_maddrs():
        if any(p.name == "ip4" for p in maddr.protocols()):
            host = maddr.value_for_protocol("ip4")
            if host not in hosts:
                hosts.append(host)
    return hosts
