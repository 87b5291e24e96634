"""Byte channels: the same receive code reads a frame from an in-memory frame, a P2P stream or a TCP socket.

A `Reader` is all the frame code needs; sending on a socket (`sock_send`) lives here too, since big socket
transfers in either direction run as blocking calls in a worker thread.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

THREAD_IO_BYTES = 4 << 20  # socket transfers from this size on run in a worker thread
HEAD_PARTS = 2  # a frame (frame.encode_frame) is [prefix, header, *the body's buffers]: its head is the first two
_THREAD_IO_TIMEOUT = 300.0  # bounds a worker thread stuck on a silent peer (callers time out much sooner)


class Reader(Protocol):
    authenticated: bool  # every byte it yields was authenticated (an AEAD): frames need no checksum of their own

    async def read_exactly(self, n: int) -> bytes: ...

    async def read_into(self, buf: memoryview) -> None: ...


class BytesReader:
    authenticated = False

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


class StreamReader:
    """`idle_timeout`: seconds without a byte before TimeoutError, so a sender that stalls mid-frame cannot hold a
    serving task forever (None: the caller's own timeout bounds the read)."""

    authenticated = True  # a libp2p stream: the p2pd daemon's secure channel (Noise/TLS) covers it

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


class SocketReader:
    """Reads straight into the destination buffer (no intermediate copies: matters at GB/s)."""

    authenticated = False

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def read_exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        await self.read_into(memoryview(buf))
        return bytes(buf)

    async def read_into(self, buf: memoryview) -> None:
        if len(buf) >= THREAD_IO_BYTES:
            await in_thread(self._sock, recv_exactly, buf)
            return
        loop = asyncio.get_running_loop()
        pos = 0
        while pos < len(buf):
            got = await loop.sock_recv_into(self._sock, buf[pos:])
            if got == 0:
                raise asyncio.IncompleteReadError(b"", len(buf) - pos)
            pos += got


def recv_exactly(sock: socket.socket, buf: memoryview) -> None:
    pos = 0
    while pos < len(buf):
        got = sock.recv_into(buf[pos:])
        if got == 0:
            raise asyncio.IncompleteReadError(b"", len(buf) - pos)
        pos += got


async def in_thread(sock: socket.socket, fn: Callable[[socket.socket, memoryview], None], buf: memoryview) -> None:
    """Big transfers run as blocking socket calls in a worker thread: they release the GIL and move megabytes per
    call, where the event loop's non-blocking path costs a loop iteration per socket-buffer's worth."""
    sock.settimeout(_THREAD_IO_TIMEOUT)
    try:
        await asyncio.to_thread(fn, sock, buf)
    finally:
        sock.setblocking(False)


async def sock_send(sock: socket.socket, frame: Sequence[bytes | memoryview]) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"".join(frame[:HEAD_PARTS]))  # prefix + header in one segment
    for buf in frame[HEAD_PARTS:]:
        if len(buf) >= THREAD_IO_BYTES:
            await in_thread(sock, _send_all, memoryview(buf))
        elif len(buf):
            await loop.sock_sendall(sock, buf)


def _send_all(sock: socket.socket, buf: memoryview) -> None:
    sock.sendall(buf)


class PlainChannel(SocketReader):
    """An unencrypted direct connection (a run with `wire.encrypt = false`); SecureChannel (crypto.py) otherwise."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.sock = sock

    async def send(self, frame: Sequence[bytes | memoryview]) -> None:
        await sock_send(self.sock, frame)
