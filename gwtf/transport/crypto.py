"""The direct TCP path's encryption: a record layer of AES-256-GCM, or ChaCha20-Poly1305 on a CPU without AES
instructions (the `cryptography` package; the serving node chooses, `CIPHER`), over a socket.

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
import itertools
import socket
import struct
from collections.abc import Iterator, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gwtf.transport.channels import HEAD_PARTS, THREAD_IO_BYTES, in_thread, recv_exactly

CHACHA = "chacha20-poly1305"
AES_GCM = "aes-256-gcm"


def _cpu_has_aes() -> bool:
    """Does this CPU have AES instructions (x86 AES-NI, ARMv8's crypto extension: the `aes` flag in cpuinfo)?"""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.split(":", 1)[0].strip() in ("flags", "Features") and "aes" in line.split()
                       for line in f)  # fmt: skip
    except OSError:
        return False


# The cipher a serving node grants (callers accept either). As TLS stacks do, AES-GCM where the CPU has AES
# instructions (measured here, one core, 1 MiB records: 3.5 GB/s against ChaCha20-Poly1305's 2.0 GB/s), ChaCha20
# where it does not (it is the fast one in software).
CIPHER = AES_GCM if _cpu_has_aes() else CHACHA
_AEADS: dict[str, type[AESGCM] | type[ChaCha20Poly1305]] = {CHACHA: ChaCha20Poly1305, AES_GCM: AESGCM}
CIPHERS = tuple(_AEADS)
NONCE_BYTES = 16  # each side's contribution to the connection's salt
RECORD_BYTES = 1 << 20  # plaintext per record
_TAG = 16
_LEN = struct.Struct("!I")  # sealed length of the record that follows
_COUNTER = struct.Struct("!4xQ")  # a record's 12-byte nonce: its number in its direction


class Tampered(ConnectionError):
    """A record failed authentication: tampered with, replayed, reordered or sealed under another key."""


def derive_keys(
    run_key: bytes | None, secret: bytes, run_id: str, caller: str, server: str, nonce_c: bytes, nonce_s: bytes,
    cipher: str = CHACHA,
) -> tuple[bytes, bytes]:  # fmt: skip
    """(caller -> server key, server -> caller key) of one connection, bound to the cipher they key."""
    info = b"\0".join([b"gwtf direct v1", run_id.encode(), caller.encode(), server.encode(), cipher.encode()])
    okm = HKDF(algorithm=SHA256(), length=64, salt=nonce_c + nonce_s, info=info).derive((run_key or b"") + secret)
    return okm[:32], okm[32:]


class SecureChannel:
    """One encrypted connection: `send` a frame, read it back through the `Reader` interface (read_exactly,
    read_into). Frames of THREAD_IO_BYTES or more are sealed and opened in a worker thread, as plain big transfers
    are (channels.py), so the event loop keeps serving meanwhile.

    Per megabyte, allocating was what cost (measured on this project's 2-core VM: ChaCha20-Poly1305 into fresh
    bytes ~0.85 GB/s, into a buffer that is already mapped ~2 GB/s; a fresh 1 MiB bytearray ~1.2 GB/s), so records
    of every frame, small or large, are sealed into one reused send buffer (length prefix and sealed bytes, sent in
    one call), received into one reused buffer, and opened straight into the reader's destination (`decrypt_into`),
    or into a reused buffer when the destination ends inside a record. The buffers are made on a channel's first
    record."""

    authenticated = True  # every record's tag is checked before a byte of it is handed on

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes, cipher: str = CHACHA) -> None:
        self.sock = sock
        aead = _AEADS[cipher]  # both take 32-byte keys (AES-256) and 12-byte nonces; their tags are 16 bytes
        self._seal, self._open = aead(send_key), aead(recv_key)
        self._sent = self._received = 0  # records so far in each direction: the next record's nonce
        self._plain = memoryview(b"")  # opened bytes not read yet (a view of _plain_buf)
        self._out: memoryview | None = None  # length prefix + sealed record, reused
        self._staging = memoryview(b"")  # a record's plaintext gathered from several of the frame's buffers, reused
        self._sealed: memoryview | None = None  # a received sealed record, reused
        self._plain_buf: memoryview | None = None  # an opened record the destination could not take whole

    # --- sending

    async def send(self, frame: Sequence[bytes | memoryview]) -> None:
        if sum(len(b) for b in frame) >= THREAD_IO_BYTES:
            await in_thread(self.sock, lambda sock, _: self._send_blocking(frame), memoryview(b""))
            return
        loop = asyncio.get_running_loop()
        for record in self._sealed_records(frame):  # sent before the next is sealed into the same buffer
            await loop.sock_sendall(self.sock, record)

    def _send_blocking(self, frame: Sequence[bytes | memoryview]) -> None:
        for record in self._sealed_records(frame):
            self.sock.sendall(record)

    def _sealed_records(self, frame: Sequence[bytes | memoryview]) -> Iterator[memoryview]:
        """The frame's records, each sealed into the one reused send buffer (length prefix and sealed bytes): a
        record is valid until the next is sealed. The frame's prefix and header are a record of their own, so the
        receiver, which reads them first, opens the body's records straight into the body's buffer (a record that
        held the header and the body's first bytes would be opened into a side buffer and copied). A record that
        spans the body's buffers is gathered into a reused staging buffer first. Nothing is allocated per frame (the
        allocator maps a fresh buffer of a megabyte anew, and its page faults cost more than the cipher). Measured on
        this project's 2-core VM, a 1 MiB frame over a socket pair and a small reply back: 1.65 ms when frames were
        sealed into fresh bytes with the header in the body's first record, 0.70 ms so (unencrypted 0.33 ms); at
        128 KiB no change (0.15 ms, unencrypted 0.06 ms: the rest is Python's per-record work)."""
        if self._out is None:
            self._out = memoryview(bytearray(_LEN.size + RECORD_BYTES + _TAG))
            self._staging = memoryview(bytearray(RECORD_BYTES))
        out = self._out
        head, body = frame[:HEAD_PARTS], frame[HEAD_PARTS:]  # the small head apart: the body's records open straight
        for chunk in itertools.chain(
            _chunks(head, RECORD_BYTES, self._staging), _chunks(body, RECORD_BYTES, self._staging)
        ):
            end = _LEN.size + len(chunk) + _TAG
            length = _LEN.pack(len(chunk) + _TAG)
            out[: _LEN.size] = length
            self._seal.encrypt_into(_COUNTER.pack(self._sent), chunk, length, out[_LEN.size : end])
            self._sent += 1
            yield out[:end]

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
        loop = asyncio.get_running_loop()
        while pos < len(buf):
            length = bytearray(_LEN.size)
            await _recv_into(loop, self.sock, memoryview(length))
            sealed = self._sealed_view(_LEN.unpack(length)[0])
            await _recv_into(loop, self.sock, sealed)
            pos += self._open_record(sealed, bytes(length), buf[pos:])

    def _fill_blocking(self, buf: memoryview) -> None:
        pos, length = 0, bytearray(_LEN.size)
        while pos < len(buf):
            recv_exactly(self.sock, memoryview(length))
            sealed = self._sealed_view(_LEN.unpack(length)[0])
            recv_exactly(self.sock, sealed)
            pos += self._open_record(sealed, bytes(length), buf[pos:])

    def _sealed_view(self, sealed_len: int) -> memoryview:
        """Where the next record's `sealed_len` bytes are received (checked first: never more than one record)."""
        if not _TAG < sealed_len <= RECORD_BYTES + _TAG:
            raise Tampered(f"a record of {sealed_len} bytes (tampered, or not this protocol)")
        if self._sealed is None:
            self._sealed = memoryview(bytearray(RECORD_BYTES + _TAG))
        return self._sealed[:sealed_len]

    def _open_record(self, sealed: memoryview, length: bytes, dest: memoryview) -> int:
        """Open a received record into `dest` (whole, if it fits; the rest waits in `_plain`): bytes written.
        (On a failed tag `decrypt_into` has written unauthenticated bytes: the read raises, nothing is handed on.)"""
        n = len(sealed) - _TAG
        if n <= len(dest):
            self._unseal(sealed, length, dest[:n])
            return n
        if self._plain_buf is None:
            self._plain_buf = memoryview(bytearray(RECORD_BYTES))
        self._unseal(sealed, length, self._plain_buf[:n])
        self._plain = self._plain_buf[:n]
        return self._take_plain(dest)

    def _take_plain(self, buf: memoryview) -> int:
        n = min(len(buf), len(self._plain))
        buf[:n] = self._plain[:n]
        self._plain = self._plain[n:]
        return n

    def _unseal(self, sealed: memoryview, length: bytes, into: memoryview) -> None:
        try:
            self._open.decrypt_into(_COUNTER.pack(self._received), sealed, length, into)
        except InvalidTag:
            raise Tampered(
                f"record {self._received} failed authentication (tampered with, replayed, reordered or another key)"
            ) from None
        self._received += 1


async def _recv_into(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        got = await loop.sock_recv_into(sock, view[pos:])
        if got == 0:
            raise asyncio.IncompleteReadError(b"", len(view))
        pos += got


def _chunks(frame: Sequence[bytes | memoryview], size: int, staging: memoryview) -> Iterator[memoryview]:
    """The frame's bytes in chunks of `size` (the last one shorter): a chunk inside one buffer is a view of it, one
    that spans buffers is gathered into `staging` (at least `size` bytes; valid until the next chunk is taken)."""
    filled = 0
    for buf in frame:
        view = memoryview(buf).cast("B")
        while len(view):
            if not filled and len(view) >= size:  # whole records straight from the buffer, no copy
                yield view[:size]
                view = view[size:]
                continue
            take = min(size - filled, len(view))
            staging[filled : filled + take] = view[:take]
            filled += take
            view = view[take:]
            if filled == size:
                yield staging[:size]
                filled = 0
    if filled:
        yield staging[:filled]
