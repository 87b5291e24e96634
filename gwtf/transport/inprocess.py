"""The in-process backend: peers in one event loop (tests, simulator); frames are really encoded and decoded."""

from __future__ import annotations

from gwtf.auth import RunAccess
from gwtf.errors import PeerError
from gwtf.transport.base import Transport
from gwtf.transport.channels import BytesReader
from gwtf.transport.links import LinkEmulator
from gwtf.transport.message import Message, MessageLimits


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
        reply = await target._serve_request(self.peer_id, BytesReader(b"".join(frame)))
        if self.network.get(peer_id) is not target:
            raise PeerError("unreachable: peer crashed during the call")
        return await self._read_reply(peer_id, BytesReader(b"".join(reply)))

    async def shutdown(self) -> None:
        if self.network.get(self.peer_id) is self:
            self.network.unregister(self.peer_id)
