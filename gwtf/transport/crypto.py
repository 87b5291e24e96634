"""The direct TCP path's encryption: a record layer of ChaCha20-Poly1305 (the `cryptography` package) over a socket.

Keys are per connection and per direction: HKDF-SHA256 over the run key (empty in an open run) and a connection
secret that the serving node handed to this one caller over libp2p (whose streams are encrypted and authenticated),
salted with a fresh nonce from each side and bound to the run id and both peer ids. So a connection's keys are
known to its two ends only, even in an open run, and a recorded connection replayed later derives other keys.

A record is a 4-byte length (authenticated as associated data) and the sealed bytes; its nonce is the record's
number in its direction, which the receiver counts itself, so a record that was tampered with, replayed, dropped,
reordered or sealed under another key fails authentication: `Tampered`, and the connection is dropped (a frame is
never half-trusted). The layout follows TLS 1.3's record protection (RFC 8446 section 5.3: per-direction keys,
sequence-number nonces), with records of up to 1 MiB since the frames here are megabytes of tensors.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gwtf.transport.channels import THREAD_IO_BYTES, in_thread, recv_exactly

CIPHER = "chacha20-poly1305"
NONCE_BYTES = 16  # each side's contribution to the connection's salt
RECORD_BYTES = 1 << 20  # plaintext per record
_TAG = 16
_LEN = struct.Struct("!I")  # sealed length of the record that follows
_COUNTER = struct.Struct("!4xQ")  # a record's 12-byte nonce: its number in its direction


class Tampered(ConnectionError):
    """A record failed authentication: tampered with, replayed, reordered or sealed under another key."""


def derive_keys(
    run_key: bytes | None, secret: bytes, run_id: str, caller: str, server: str, nonce_c: bytes, nonce_s: bytes
) -> tuple[bytes, bytes]:
    """(caller -> server key, server -> caller key) of one connection."""
    info = b"\0".join([b"gwtf direct v1", run_id.encode(), caller.encode(), server.encode()])
    okm = HKDF(algorithm=SHA256(), length=64, salt=nonce_c + nonce_s, info=info).derive((run_key or b"") + secret)
    return okm[:32], okm[32:]


class SecureChannel:
    """One encrypted connection: `send` a frame, read it back through the `Reader` interface (read_exactly,
    read_into). Frames of THREAD_IO_BYTES or more are sealed and opened in a worker thread, as plain big transfers
    are (channels.py), so the event loop keeps serving meanwhile."""

    authenticated = True  # every record's tag is checked before a byte of it is handed on

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes) -> None:
        self.sock = sock
        self._seal, self._open = ChaCha20Poly1305(send_key), ChaCha20Poly1305(recv_key)
        self._sent = self._received = 0  # records so far in each direction: the next record's nonce
        self._plain = memoryview(b"")  # opened bytes not read yet

    # --- sending

    async def send(self, frame: Sequence[bytes | memoryview]) -> None:
        if sum(len(b) for b in frame) >= THREAD_IO_BYTES:
            await in_thread(self.sock, lambda sock, _: self._send_blocking(frame), memoryview(b""))
        else:
            await asyncio.get_running_loop().sock_sendall(self.sock, b"".join(self._records(frame)))

    def _send_blocking(self, frame: Sequence[bytes | memoryview]) -> None:
        for record in self._records(frame):
            self.sock.sendall(record)

    def _records(self, frame: Sequence[bytes | memoryview]) -> Iterator[bytes]:
        for chunk in _chunks(frame, RECORD_BYTES):
            length = _LEN.pack(len(chunk) + _TAG)
            sealed = self._seal.encrypt(_COUNTER.pack(self._sent), chunk, length)
            self._sent += 1
            yield length + sealed

    # --- receiving (the Reader interface)

    async def read_exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        await self.read_into(memoryview(buf))
        return bytes(buf)

    async def read_into(self, buf: memoryview) -> None:
        pos = self._take_plain(buf)
        if len(buf) - pos >= THREAD_IO_BYTES:
            await in_thread(self.sock, lambda sock, rest: self._fill_blocking(rest), buf[pos:])
            return
        while pos < len(buf):
            length = await self._recv(_LEN.size)
            sealed_len = self._check_length(_LEN.unpack(length)[0])
            self._plain = self._unseal(await self._recv(sealed_len), length)
            pos += self._take_plain(buf[pos:])

    def _fill_blocking(self, buf: memoryview) -> None:
        pos = 0
        while pos < len(buf):
            length = bytearray(_LEN.size)
            recv_exactly(self.sock, memoryview(length))
            sealed = bytearray(self._check_length(_LEN.unpack(length)[0]))
            recv_exactly(self.sock, memoryview(sealed))
            self._plain = self._unseal(sealed, bytes(length))
            pos += self._take_plain(buf[pos:])

    def _take_plain(self, buf: memoryview) -> int:
        n = min(len(buf), len(self._plain))
        buf[:n] = self._plain[:n]
        self._plain = self._plain[n:]
        return n

    async def _recv(self, n: int) -> bytes:
        data = bytearray(n)
        view, pos, loop = memoryview(data), 0, asyncio.get_running_loop()
        while pos < n:
            got = await loop.sock_recv_into(self.sock, view[pos:])
            if got == 0:
                raise asyncio.IncompleteReadError(bytes(data[:pos]), n)
            pos += got
        return bytes(data)

    @staticmethod
    def _check_length(sealed_len: int) -> int:
        if not _TAG < sealed_len <= RECORD_BYTES + _TAG:
            raise Tampered(f"a record of {sealed_len} bytes (tampered, or not this protocol)")
        return sealed_len

    def _unseal(self, sealed: bytes | bytearray, length: bytes) -> memoryview:
        try:
            plain = self._open.decrypt(_COUNTER.pack(self._received), sealed, length)
        except InvalidTag:
            raise Tampered(
                f"record {self._received} failed authentication (tampered with, replayed, reordered or another key)"
            ) from None
        self._received += 1
        return memoryview(plain)


def _chunks(frame: Sequence[bytes | memoryview], size: int) -> Iterator[bytes | memoryview]:
    """The frame's bytes in chunks of `size` (the last one shorter); a chunk inside one buffer is a view of it."""
    pending: list[bytes | memoryview] = []
    pending_len = 0
    for buf in frame:
        view = memoryview(buf).cast("B")
        while len(view):
            if not pending and len(view) >= size:  # whole records straight from the buffer, no copy
                yield view[:size]
                view = view[size:]
                continue
            take = min(size - pending_len, len(view))
            pending.append(view[:take])
            pending_len += take
            view = view[take:]
            if pending_len == size:
                yield b"".join(pending)
                pending, pending_len = [], 0
    if pending:
        yield b"".join(pending)
