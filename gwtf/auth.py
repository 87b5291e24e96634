"""Joining by invitation: the run key, per-call proofs bound to libp2p peer ids, and signed DHT records.

A run is either open or keyed. For a keyed run `gwtf bootstrap --key FILE` creates (or takes) a 32-byte secret,
the run key; whoever holds the file is invited (`gwtf join --key FILE`). What the key buys:

- every transport call carries `proof(sender, receiver)`, an HMAC of the run id and both libp2p peer ids; the
  receiver recomputes it for the sender that the channel authenticated (libp2p identity on P2P, a token handed out
  over P2P on the direct TCP path) and refuses the call otherwise. Replies carry the proof the other way, so a
  member never takes tensors from an outsider either. A proof names its sender, so one seen on the wire is worth
  nothing to another peer id, and libp2p keeps anyone from speaking under a peer id whose private key it lacks;
  this is why a fixed tag per link does the job of a challenge-response here, without a round trip per call;
- every DHT record of the run carries an HMAC (`RunKeyValidator`), so DHT peers refuse writes by outsiders and
  readers drop records that lack a valid one.

The key is a shared secret: every member can invite others (by handing the file on) and nobody outside can.
The threat model is in docs/security.md.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from gwtf.errors import BadMessage, UserError

logger = logging.getLogger(__name__)

KEY_BYTES = 32
_MAC_RE = re.compile(rb"\[gwtf-mac:([0-9a-f]{64})\]$")


@dataclass(frozen=True)
class RunAccess:
    """Who may take part in run `run_id`: anyone (`key is None`, an open run) or the holders of `key`."""

    run_id: str
    key: bytes | None = None

    def __post_init__(self) -> None:
        if self.key is not None and len(self.key) != KEY_BYTES:
            raise ValueError(f"a run key has {KEY_BYTES} bytes, got {len(self.key)}")

    @classmethod
    def open(cls, run_id: str) -> RunAccess:
        return cls(run_id, None)

    @property
    def keyed(self) -> bool:
        return self.key is not None

    @property
    def key_id(self) -> str:
        """A public fingerprint of the key (published in the run record; reveals nothing about the key)."""
        return self._mac(b"key-id")[:16] if self.key is not None else ""

    def proof(self, sender: str, receiver: str) -> str:
        """What `sender` attaches to a message for `receiver` ("" in an open run)."""
        if self.key is None:
            return ""
        return self._mac(b"call", sender.encode(), receiver.encode())

    def check(self, sender: str, receiver: str, proof: object) -> None:
        """BadMessage unless `proof` is `sender`'s proof for `receiver` (always passes in an open run)."""
        if self.key is None:
            return
        if not isinstance(proof, str) or not hmac.compare_digest(proof, self.proof(sender, receiver)):
            raise BadMessage(
                f"unauthorized: {sender} holds no invitation to run {self.run_id!r} "
                "(the run is by invitation: join with --key FILE, the run key from whoever bootstrapped it)"
            )

    def record_mac(self, parts: tuple[bytes, bytes, bytes, float]) -> str:
        assert self.key is not None
        key, subkey, value, expiration = parts
        return self._mac(b"record", key, subkey, value, repr(float(expiration)).encode())

    def _mac(self, *parts: bytes) -> str:
        assert self.key is not None
        # length-prefixed parts: no two different tuples give the same message
        msg = b"".join(len(p).to_bytes(4, "big") + p for p in (self.run_id.encode(), *parts))
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()


def create_key(path: str | Path) -> bytes:
    """A new run key in `path` (hex, owner-only permissions). Refuses to overwrite an existing file."""
    path = Path(path)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(f"{path} already exists; pass it to use it, or choose a new path") from None
    except OSError as exc:
        raise UserError(f"cannot create the run key file {path}: {exc.strerror}; choose a writable path") from None
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def load_key(path: str | Path) -> bytes:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(
            f"cannot read the run key {path}: {exc.strerror}; ask the run's owner for the key file"
        ) from None
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except ValueError:  # not ASCII (UnicodeDecodeError is a ValueError) or not hex
        key = b""
    if len(key) != KEY_BYTES:
        raise UserError(f"{path} is not a run key ({KEY_BYTES * 2} hex digits); ask the run's owner for the key file")
    return key


# What an open run protects and what it does not (docs/security.md has the threat model).
OPEN_RUN_WARNING = (
    "run %s is OPEN: anyone who reaches it can join, read the model and what it is sent, and send tensors (each is "
    "checked: sizes, dtypes, finite values); what travels is still encrypted and authenticated per peer "
    "(libp2p streams, and the direct TCP path keyed per connection), so nobody on the path can read or alter it; "
    "--key FILE makes the run by invitation"
)


def bootstrap_access(run_id: str, key_file: str | None, open_run: bool) -> RunAccess:
    """`gwtf bootstrap`: take the key in `key_file` or create it there; `--open` for a run without one."""
    if key_file and open_run:
        raise UserError("--key and --open exclude each other: a run is either by invitation or open")
    if open_run or not key_file:
        logger.log(logging.INFO if open_run else logging.WARNING, OPEN_RUN_WARNING, run_id)
        return RunAccess.open(run_id)
    if Path(key_file).exists():
        return RunAccess(run_id, load_key(key_file))
    key = create_key(key_file)
    logger.info("created the run key %s: hand it to the volunteers you invite (gwtf join --key FILE)", key_file)
    return RunAccess(run_id, key)


def join_access(run_id: str, key_file: str | None) -> RunAccess:
    return RunAccess(run_id, load_key(key_file)) if key_file else RunAccess.open(run_id)


def check_run_access(access: RunAccess, run_key_id: str) -> None:
    """Refuse, with a clear line, a joiner whose key does not match the run's (`run_key_id` from its record)."""
    if run_key_id and not access.keyed:
        raise UserError(
            f"run {access.run_id!r} is by invitation: join with --key FILE (the run key from whoever bootstrapped it)"
        )
    if run_key_id and access.key_id != run_key_id:
        raise UserError(f"this key is not the key of run {access.run_id!r}; ask its owner for the right key file")
    if not run_key_id and access.keyed:
        raise UserError(f"run {access.run_id!r} is open: join it without --key")


class RunKeyValidator:
    """A hivemind record validator: records under the run's DHT keys must carry the run key's MAC.

    Duck-typed (hivemind's base class only documents the methods), so this module imports without hivemind.

    Signing appends `[gwtf-mac:HEX]` over (key, subkey, value, expiry); it runs before the RSA owner signature
    (lower priority), so the owner signs the MAC too and validation strips the signature first. A peer without the
    key (open access) only strips MACs, so it can still read a keyed run's record and learn that it needs a key.
    """

    def __init__(self, access: RunAccess, dht_keys: list[str]) -> None:
        from hivemind.dht.routing import DHTID

        self.access = access
        self._ids = {DHTID.generate(source=k).to_bytes() for k in dht_keys}

    def validate(self, record) -> bool:  # hivemind.dht.validation.DHTRecord
        if self.access.key is None or record.key not in self._ids:
            return True
        match = _MAC_RE.search(record.value)
        if match is None:
            logger.debug("DHT record without the run's MAC refused")
            return False
        stripped = record.value[: match.start()]
        parts = (record.key, record.subkey, stripped, record.expiration_time)
        return hmac.compare_digest(match.group(1).decode(), self.access.record_mac(parts))

    def sign_value(self, record) -> bytes:
        if self.access.key is None or record.key not in self._ids:
            return record.value
        mac = self.access.record_mac((record.key, record.subkey, record.value, record.expiration_time))
        return record.value + b"[gwtf-mac:" + mac.encode() + b"]"

    def strip_value(self, record) -> bytes:
        return _MAC_RE.sub(b"", record.value)

    @property
    def priority(self) -> int:
        return 5  # below RSASignatureValidator's 10: signed first, validated after it

    def merge_with(self, other: object) -> bool:
        return False


__all__ = [
    "RunAccess",
    "RunKeyValidator",
    "bootstrap_access",
    "check_run_access",
    "create_key",
    "join_access",
    "load_key",
]
