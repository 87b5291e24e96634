"""The direct TCP path for tensors, beside hivemind P2P (libp2p streams through the p2pd daemon reach ~200-250 MB/s on
loopback, far below a socket): encrypted, authenticated, and optional (a peer it cannot reach is called over P2P).

A node listens on a TCP socket where it listens for libp2p (`--host-maddrs`) and announces the addresses peers
should dial (`--announce-maddrs`, else the addresses it listens on). A caller first asks the node over P2P (the
`HELLO` handler; P2P has authenticated the caller and encrypts the stream) for its endpoint; the node answers with
its addresses and port, a handle and a secret bound to the caller's peer id. Every TCP connection starts with the
handle and a nonce from each side; both ends then derive the connection's keys from the run key, the secret, both
peer ids and both nonces (crypto.py), so the sender of a frame is as trustworthy as on P2P and its bytes are sealed.
A connection carries one request after another, each answered on it; idle connections are kept per peer.

A caller that can connect to none of a peer's announced addresses (a volunteer behind NAT, a firewalled port) says
so once, raises `DirectUnreachable` (nothing was sent) and the transport takes the P2P stream instead, which libp2p
may route through a circuit relay (`--use-relay`); the direct path to that peer is tried again after a while. A
peer that was reached at that endpoint before and now refuses is gone (crashed): that call fails at once, as it
would have on P2P, rather than waiting on libp2p for a dead peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gwtf.errors import PeerError
from gwtf.transport.channels import PlainChannel, SocketReader
from gwtf.transport.crypto import CIPHER, CIPHERS, NONCE_BYTES, SecureChannel, Tampered, derive_keys
from gwtf.transport.frame import is_error_frame
from gwtf.transport.message import Message

logger = logging.getLogger(__name__)

HELLO = "_gwtf.tcp_hello"  # internal handler: hands out this node's direct TCP endpoint and a connection secret
REACH = "_gwtf.reach"  # internal handler: dial the caller's direct path back and say whether it connects (doctor)
_HANDLE_BYTES = 16
_SECRET_BYTES = 32
_TCP_HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT_S = 3.0  # per announced address: a firewall that drops packets costs this much, once per peer
RETRY_DIRECT_S = 60.0  # a peer whose direct path was unreachable is called over P2P this long, then tried again
_HELLO_RETRY_S = 0.1

Channel = PlainChannel | SecureChannel
Serve = Callable[[str, Any], Awaitable[list[bytes | memoryview]]]  # (sender, channel) -> reply frame
ReadReply = Callable[[str, Any], Awaitable[Message]]  # (peer, channel) -> reply
AskEndpoint = Callable[[str], Awaitable[dict[str, Any]]]  # peer -> its HELLO reply's meta (asked over P2P)


class DirectUnreachable(Exception):
    """None of a peer's announced direct addresses could be connected to; nothing of the call was sent."""


@dataclass(frozen=True)
class Endpoint:
    """What a peer's HELLO answered this node: where to dial, and this caller's handle and secret there."""

    hosts: tuple[str, ...]
    port: int
    handle: bytes
    secret: bytes
    cipher: str  # one of crypto.CIPHERS (the one the peer chose), or "none" (a run with wire.encrypt = false)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Endpoint | None:
        try:
            hosts = tuple(str(h) for h in meta["hosts"])
            handle, secret = bytes.fromhex(meta["handle"]), bytes.fromhex(meta["secret"])
            port, cipher = meta["port"], meta["cipher"]
        except (KeyError, TypeError, ValueError):
            return None  # no listener (an empty grant) or not a grant at all
        ok = bool(hosts) and isinstance(port, int) and len(handle) == _HANDLE_BYTES and cipher in (*CIPHERS, "none")
        return cls(hosts, port, handle, secret, cipher) if ok else None


class DirectTcp:
    """One node's direct TCP path: the listener and the secrets it handed out (serving), the peers' endpoints and
    the idle connections to them (calling). Frames are checked by the transport that owns it (`serve`,
    `read_reply`); the endpoints are asked for through it (`ask_endpoint`)."""

    def __init__(
        self,
        owner: str,
        serve: Serve,
        read_reply: ReadReply,
        ask_endpoint: AskEndpoint,
        run_id: str = "",
        run_key: bytes | None = None,
        encrypt: bool = True,
    ) -> None:
        self.owner = owner  # this node's peer id: the keys and the logs name it
        self.run_id, self._run_key, self.encrypt = run_id, run_key, encrypt
        self._serve = serve
        self._read_reply = read_reply
        self._ask_endpoint = ask_endpoint
        self.server: socket.socket | None = None
        self.announce: list[str] = []  # the addresses a HELLO hands out
        self._tasks: set[asyncio.Task] = set()
        self._grants: dict[bytes, tuple[str, bytes]] = {}  # handle -> (peer id, secret)
        self._grant_of_peer: dict[str, tuple[bytes, bytes]] = {}
        self._endpoints: dict[str, Endpoint | None] = {}  # None: that peer offers no direct path
        self._unreachable_until: dict[str, float] = {}
        self._reached: dict[str, Endpoint] = {}  # the endpoint each peer was last reached at
        self.idle: dict[str, list[Channel]] = {}
        self._dialing = False

    # --- serving

    def listen(self, host: str, announce: list[str] | None = None, port: int = 0) -> None:
        """Listen on `host` ("0.0.0.0": every interface) and hand out `announce` (default: `host` itself)."""
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, port))
        server.listen(64)
        server.setblocking(False)
        self.server = server
        self.announce = list(announce or [host])
        self._spawn(self._accept_loop(server))

    @property
    def port(self) -> int | None:
        return self.server.getsockname()[1] if self.server is not None else None

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, server: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:  # ends when close cancels it
            conn, _ = await loop.sock_accept(server)
            _tune(conn)
            self._spawn(self._serve_connection(conn))

    async def _serve_connection(self, conn: socket.socket) -> None:
        sender = "?"
        try:
            hello = await asyncio.wait_for(
                SocketReader(conn).read_exactly(_HANDLE_BYTES + NONCE_BYTES), _TCP_HANDSHAKE_TIMEOUT
            )
            grant = self._grants.get(hello[:_HANDLE_BYTES])
            if grant is None:
                logger.warning("%s: TCP connection with an unknown handle refused", self.owner)
                return
            sender, secret = grant
            nonce_s = secrets.token_bytes(NONCE_BYTES)
            await asyncio.get_running_loop().sock_sendall(conn, nonce_s)
            channel = self._channel(conn, secret, sender, self.owner, hello[_HANDLE_BYTES:], nonce_s, serving=True)
            while True:  # one request after another until the caller closes the connection
                reply = await self._serve(sender, channel)
                await channel.send(reply)
                if is_error_frame(reply):
                    return
        except Tampered as exc:
            logger.warning("%s: dropped the direct connection from %s: %s", self.owner, sender, exc)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the caller went away; nothing to answer
        finally:
            _close(conn)

    def _channel(
        self, sock: socket.socket, secret: bytes, caller: str, server: str, nonce_c: bytes, nonce_s: bytes,
        serving: bool, cipher: str | None = None,
    ) -> Channel:  # fmt: skip
        cipher = cipher or (CIPHER if self.encrypt else "none")
        if cipher == "none":
            return PlainChannel(sock)
        to_server, to_caller = derive_keys(self._run_key, secret, self.run_id, caller, server, nonce_c, nonce_s, cipher)
        keys = (to_caller, to_server) if serving else (to_server, to_caller)
        return SecureChannel(sock, *keys, cipher=cipher)

    def grant(self, peer_id: str) -> dict[str, Any]:
        """The HELLO reply's meta for `peer_id`: where to dial, its handle and secret (empty: no listener)."""
        if self.server is None:
            return {}
        if peer_id not in self._grant_of_peer:
            handle, secret = secrets.token_bytes(_HANDLE_BYTES), secrets.token_bytes(_SECRET_BYTES)
            self._grant_of_peer[peer_id], self._grants[handle] = (handle, secret), (peer_id, secret)
        handle, secret = self._grant_of_peer[peer_id]
        cipher = CIPHER if self.encrypt else "none"
        return {"hosts": self.announce, "port": self.port, "handle": handle.hex(), "secret": secret.hex(),
                "cipher": cipher}  # fmt: skip

    # --- calling

    async def endpoint(self, peer_id: str) -> Endpoint | None:
        """The peer's endpoint and this node's secret there, asked once; None if it offers no direct path or it
        was unreachable less than RETRY_DIRECT_S ago."""
        if self._unreachable_until.get(peer_id, 0.0) > time.monotonic():
            return None
        if peer_id not in self._endpoints:
            try:
                meta = await self._ask_endpoint(peer_id)
            except (PeerError, OSError, EOFError, asyncio.IncompleteReadError) as exc:
                # The first stream between two peers is the one a libp2p dial race can reset (both dialing at
                # once, one connection is closed under it); asking is idempotent: once more, then it counts.
                if isinstance(exc, PeerError) and not str(exc).startswith("unreachable"):
                    raise
                logger.info("%s: asking %s for its endpoint failed (%s); once more", self.owner, peer_id, exc)
                await asyncio.sleep(_HELLO_RETRY_S)
                meta = await self._ask_endpoint(peer_id)
            self._endpoints[peer_id] = Endpoint.from_meta(meta)
        return self._endpoints[peer_id]

    def sealed_to(self, peer_id: str) -> bool:
        """Does a call to `peer_id` go over an authenticated channel: a sealed direct connection, or libp2p because
        its direct path is unreachable? (False while its endpoint is unknown, or if it runs the direct path plain.)"""
        if self._unreachable_until.get(peer_id, 0.0) > time.monotonic():
            return True
        endpoint = self._endpoints.get(peer_id)
        return endpoint is not None and endpoint.cipher != "none" or (peer_id in self._endpoints and endpoint is None)

    async def call(self, peer_id: str, endpoint: Endpoint, frame: list[bytes | memoryview]) -> Message:
        """DirectUnreachable if no connection could be made (nothing sent); otherwise the reply, or the error of a
        call that failed on the way (the peer may have seen the request)."""
        idle = self.idle.setdefault(peer_id, [])
        while idle and _dropped(idle[-1].sock):  # the peer closed a kept connection meanwhile: its send would be lost
            _close(idle.pop().sock)
        channel = idle.pop() if idle else await self._connect(peer_id, endpoint)
        reusable = False
        try:
            await channel.send(frame)
            reply = await self._read_reply(peer_id, channel)
            reusable = True
            return reply
        finally:
            if reusable:
                idle.append(channel)
            else:  # cancelled or failed mid-frame: the connection is out of step
                _close(channel.sock)

    async def _connect(self, peer_id: str, endpoint: Endpoint) -> Channel:
        failures = []
        for host in endpoint.hosts:
            try:
                channel = await self._dial(host, endpoint, peer_id)
                self._reached[peer_id] = endpoint
                return channel
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                failures.append(f"{host}:{endpoint.port}: {type(exc).__name__} {exc}".strip())
        self._endpoints.pop(peer_id, None)  # it may have restarted elsewhere: ask again next time
        if self._reached.pop(peer_id, None) == endpoint:  # it answered there before: gone, not unreachable
            raise ConnectionError(f"direct TCP: {'; '.join(failures)}")
        # It cannot be reached from here (NAT, firewall): P2P for a while, where libp2p finds a way.
        self._unreachable_until[peer_id] = time.monotonic() + RETRY_DIRECT_S
        logger.warning(
            "%s: no direct TCP path to %s (%s); calling it over libp2p streams for the next %gs",
            self.owner, peer_id, "; ".join(failures), RETRY_DIRECT_S,
        )  # fmt: skip
        raise DirectUnreachable(f"no direct TCP path to {peer_id}")

    async def _dial(self, host: str, endpoint: Endpoint, peer_id: str) -> Channel:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, endpoint.port)), CONNECT_TIMEOUT_S)
            _tune(sock)
            nonce_c = secrets.token_bytes(NONCE_BYTES)
            await loop.sock_sendall(sock, endpoint.handle + nonce_c)
            nonce_s = await asyncio.wait_for(SocketReader(sock).read_exactly(NONCE_BYTES), CONNECT_TIMEOUT_S)
        except BaseException:
            sock.close()
            raise
        return self._channel(sock, endpoint.secret, self.owner, peer_id, nonce_c, nonce_s, False, endpoint.cipher)

    async def dial_back(self, peer_id: str) -> dict[str, str]:
        """Can this node open a direct connection to `peer_id` (asked afresh, not from the cache)? For `gwtf doctor`:
        {"direct": "ok" | "unreachable" | "none", "detail": ...}. One at a time, each dial bounded."""
        if self._dialing:
            return {"direct": "busy", "detail": "another dial-back is running here; ask again"}
        self._dialing = True
        try:
            endpoint = Endpoint.from_meta(await self._ask_endpoint(peer_id))
            if endpoint is None:
                return {"direct": "none", "detail": "it offers no direct TCP path"}
            failures = []
            for host in endpoint.hosts[:4]:
                try:
                    _close((await self._dial(host, endpoint, peer_id)).sock)
                    return {"direct": "ok", "detail": f"{host}:{endpoint.port}"}
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    failures.append(f"{host}:{endpoint.port}: {type(exc).__name__} {exc}".strip())
            return {"direct": "unreachable", "detail": "; ".join(failures)}
        finally:
            self._dialing = False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            self.server = None  # no endpoint is handed out any more: callers take P2P
        for channels in self.idle.values():
            for channel in channels:
                channel.sock.close()
        self.idle.clear()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a worker thread blocked on it
    sock.close()


def _dropped(sock: socket.socket) -> bool:
    """Has the peer closed (or reset) this idle connection? An idle connection has nothing to read: a readable one
    is at its end or out of step. (A request sent on it would vanish, and the call fail as if the peer were gone.)"""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # b"": the peer's FIN; a byte: out of step
        return True
    except (BlockingIOError, InterruptedError):
        return False  # nothing to read: open
    except OSError:
        return True  # reset


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
