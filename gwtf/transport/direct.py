"""The token-authenticated direct TCP path for large tensors, beside hivemind P2P (libp2p streams through the p2pd
daemon reach ~200-250 MB/s on loopback, far below a socket).

A node listens on a plain TCP socket. A caller first asks the node over P2P (the `HELLO` handler, which P2P has
already authenticated) for its endpoint; the node answers with a random token bound to the caller's peer id, and
every TCP connection starts with that token, so the sender of a TCP frame is as trustworthy as on P2P (the bytes
themselves are not encrypted on that path). A connection carries one request after another, each answered on it;
idle connections are kept per peer for the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from gwtf.errors import PeerError
from gwtf.transport.channels import Reader, SocketReader, sock_send
from gwtf.transport.frame import is_error_frame
from gwtf.transport.message import Message

logger = logging.getLogger(__name__)

HELLO = "_gwtf.tcp_hello"  # internal handler: hands out this node's direct TCP endpoint and an access token
_TOKEN_BYTES = 16
_TCP_HANDSHAKE_TIMEOUT = 10.0
_HELLO_RETRY_S = 0.1

Endpoint = tuple[str, int, bytes]  # host, port, token
Serve = Callable[[str, Reader], Awaitable[list[bytes | memoryview]]]  # (sender, channel) -> reply frame
ReadReply = Callable[[str, Reader], Awaitable[Message]]  # (peer, channel) -> reply
AskEndpoint = Callable[[str], Awaitable[dict[str, Any]]]  # peer -> its HELLO reply's meta (asked over P2P)


class DirectTcp:
    """One node's direct TCP path: the listener and the tokens it handed out (serving), the peers' endpoints and
    the idle connections to them (calling). Frames are checked by the transport that owns it (`serve`,
    `read_reply`); the endpoints are asked for through it (`ask_endpoint`)."""

    def __init__(self, owner: str, serve: Serve, read_reply: ReadReply, ask_endpoint: AskEndpoint) -> None:
        self.owner = owner  # this node's peer id, for the logs
        self._serve = serve
        self._read_reply = read_reply
        self._ask_endpoint = ask_endpoint
        self.server: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._peer_of_token: dict[bytes, str] = {}
        self._token_of_peer: dict[str, bytes] = {}
        self._endpoints: dict[str, Endpoint | None] = {}  # None: that peer offers no direct path
        self.idle: dict[str, list[socket.socket]] = {}

    # --- serving

    def listen(self, host: str) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind((host, 0))
        server.listen(64)
        server.setblocking(False)
        self.server = server
        self._spawn(self._accept_loop(server))

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
        reader = SocketReader(conn)
        try:
            token = await asyncio.wait_for(reader.read_exactly(_TOKEN_BYTES), _TCP_HANDSHAKE_TIMEOUT)
            sender = self._peer_of_token.get(token)
            if sender is None:
                logger.warning("%s: TCP connection with an unknown token refused", self.owner)
                return
            while True:  # one request after another until the caller closes the connection
                reply = await self._serve(sender, reader)
                await sock_send(conn, reply)
                if is_error_frame(reply):
                    return
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the caller went away; nothing to answer
        finally:
            _close(conn)

    def grant(self, peer_id: str) -> dict[str, Any]:
        """The HELLO reply's meta for `peer_id`: this node's endpoint and that peer's token (empty: no listener)."""
        if self.server is None:
            return {}
        token = self._token_of_peer.get(peer_id)
        if token is None:
            token = secrets.token_bytes(_TOKEN_BYTES)
            self._token_of_peer[peer_id], self._peer_of_token[token] = token, peer_id
        host, port = self.server.getsockname()[:2]
        return {"host": host, "port": port, "token": token.hex()}

    # --- calling

    async def endpoint(self, peer_id: str) -> Endpoint | None:
        """The peer's endpoint and the token it gave this node, asked once; None if it offers no direct path."""
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
            ok = isinstance(meta.get("host"), str) and isinstance(meta.get("port"), int)
            self._endpoints[peer_id] = (meta["host"], meta["port"], bytes.fromhex(meta["token"])) if ok else None
        return self._endpoints[peer_id]

    async def call(self, peer_id: str, endpoint: Endpoint, frame: list[bytes | memoryview]) -> Message:
        idle = self.idle.setdefault(peer_id, [])
        while idle and _dropped(idle[-1]):  # the peer closed a kept connection meanwhile: its send would be lost
            _close(idle.pop())
        sock = idle.pop() if idle else await self._connect(peer_id, endpoint)
        reusable = False
        try:
            await sock_send(sock, frame)
            reply = await self._read_reply(peer_id, SocketReader(sock))
            reusable = True
            return reply
        finally:
            if reusable:
                idle.append(sock)
            else:  # cancelled or failed mid-frame: the connection is out of step
                _close(sock)

    async def _connect(self, peer_id: str, endpoint: Endpoint) -> socket.socket:
        host, port, token = endpoint
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            _tune(sock)
            await sock_send(sock, [token])
        except OSError:
            sock.close()
            self._endpoints.pop(peer_id, None)  # it may have restarted elsewhere: ask again next time
            raise
        return sock

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
        for socks in self.idle.values():
            for sock in socks:
                sock.close()
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
