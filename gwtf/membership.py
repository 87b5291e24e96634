"""Who is in a run: the run's own record and one signed, expiring record per node; `gwtf status`.

Every node re-announces its `NodeRecord` every few seconds with a short time to live, so a node whose record has
expired is dead. Two backends: `InMemoryMembership` (one shared dict, for in-process swarms and tests) and
`DHTMembership` over hivemind's DHT, where each node writes under a subkey that carries its RSA public key and
hivemind's `RSASignatureValidator` rejects any write to that subkey not signed by the matching private key.

That RSA key is also the node's libp2p identity (`make_dht` hands it to the p2p daemon), so the subkey determines
the peer id: a record whose `peer_id` is not the one derived from its subkey's key is dropped by every reader, and no
node can speak for another. In a keyed run (gwtf.auth) every record also carries the run key's MAC.

Data nodes also publish their telemetry (gwtf.telemetry) the same way, under `gwtf/<run>/telemetry`, one subkey each,
for the people watching the run (`gwtf dashboard`).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gwtf import lifecycle
from gwtf.auth import RunAccess, RunKeyValidator, check_run_access
from gwtf.errors import UserError

logger = logging.getLogger(__name__)

ROLES = ("relay", "data")
STATUSES = ("joining", "serving", "leaving")
RUN_TTL_S = 7 * 24 * 3600.0  # the run record outlives any node; bootstrap may publish it again
DHT_TIMEOUT_S = 10.0  # bound on one DHT store or lookup
STORE_ATTEMPTS = 2  # a store that no peer kept is tried once more before it is reported
DHT_OPS_ENV = "GWTF_DHT_OPS"  # a folder: each process keeps its count of DHT reads and writes there (benchmarks)
DHT_PROCESS_ENV = "GWTF_DHT_PROCESS"  # "1": hivemind.DHT's forked process, not gwtf.dht (a benchmark's baseline)
SHARING_ENV = "HIVEMIND_MEMORY_SHARING_STRATEGY"  # hivemind's name: torch's tensor sharing between its processes
LOOPBACK_KW: dict[str, Any] = {
    "host_maddrs": ["/ip4/127.0.0.1/tcp/0"],
    "nat_port_map": False,
    "auto_nat": False,
    "use_relay": False,
}


@dataclass
class RunRecord:
    run_id: str
    model: dict[str, Any]  # ModelConfig.to_dict()
    model_hash: str
    config: dict[str, Any]  # the whole run config
    created: float = field(default_factory=time.time)
    key_id: str = ""  # fingerprint of the run key ("" for an open run): gwtf.auth.check_run_access


@dataclass
class NodeRecord:
    peer_id: str
    role: str  # "relay" | "data"
    stage: int
    status: str  # "joining" | "serving" | "leaving"
    capacity: int
    compute_s: float
    region: str | None
    state_version: int
    holds_weights: bool
    grad_norm: float | None
    throughput: float
    microbatches_done: int
    maddrs: list[str] = field(default_factory=list)
    room: int = -1  # router gwtf-p2p: microbatches the relay's routing agent can still take (-1: not routing)
    device: str = "cpu"  # where its stage computes ("cpu", "cuda")
    held: int = 0  # microbatches it holds now (forward done, backward not yet)
    rebuilt_from: str = ""  # a relay whose stage was rebuilt: how ("mean(1,3)", "shadow@stage 1 v4")

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"NodeRecord.role must be one of {ROLES}, got {self.role!r}")
        if self.status not in STATUSES:
            raise ValueError(f"NodeRecord.status must be one of {STATUSES}, got {self.status!r}")
        if self.stage < 0 or self.capacity < 0:
            raise ValueError("NodeRecord.stage and capacity must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def serving(nodes: dict[str, NodeRecord], role: str, stage: int | None = None) -> dict[str, NodeRecord]:
    """The records of `nodes` that serve in `role` (and `stage`, if given)."""
    return {
        p: r
        for p, r in nodes.items()
        if r.role == role and r.status == "serving" and (stage is None or r.stage == stage)
    }


class DhtOps:
    """This process's DHT reads and writes, by operation and record kind ("read nodes", "write telemetry", ...):
    what a node's membership costs its DHT peer. With DHT_OPS_ENV set, the counts are also written (at most every
    `every` seconds, and at exit) to `<folder>/<pid>.json`, which benchmarks.throughput reads per process. The
    variable is read at the first count, not at import: a node forked from a zygote (gwtf.launch.zygote) imported
    this module before its environment was set."""

    def __init__(self, every: float = 0.25) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._every, self._written = every, float("-inf")  # the first count is written at once
        self._folder: str | None = None
        self._folder_read = False

    def _target(self) -> str | None:
        if not self._folder_read:
            self._folder_read = True
            self._folder = os.environ.get(DHT_OPS_ENV)
            if self._folder:
                atexit.register(self.write)
        return self._folder

    def add(self, op: str, key: str) -> None:
        name = f"{op} {key.rsplit('/', 1)[-1]}"
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1
        if self._target() and time.monotonic() - self._written >= self._every:
            self.write()

    def write(self) -> None:
        folder = self._target()
        if not folder:
            return
        self._written = time.monotonic()
        with self._lock:
            data = json.dumps({"time": time.time(), "counts": self.counts})
        path = os.path.join(folder, f"{os.getpid()}.json")
        try:
            with open(path + ".tmp", "w") as f:
                f.write(data)
            os.replace(path + ".tmp", path)  # a reader never sees half a file
        except OSError as exc:
            logger.debug("cannot write the DHT counts to %s: %s", path, exc)


DHT_OPS = DhtOps()


class RunEnd:
    """Whether a run is over, from the records a node reads: some node reached the run's last step (its state
    version), and no data node serves any more (one that lingers after the last step keeps the run up, for export).

    A data node that stops says so in its record ("leaving"): seen, the run is over at once; so it is when no node
    but the reader (`me`) serves any more (the bootstrap, the last to go, need not wait). Otherwise (a data node that
    died at the end, one whose record a loaded DHT let lapse, a read that missed it) the run is over only once no data
    node has been seen serving for `grace` seconds: at SmolLM2 size on one loaded machine, every relay once read the
    lingering data node's record as gone at the same moment and exited under the export."""

    def __init__(self, total_steps: int, grace: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 me: str | None = None) -> None:  # fmt: skip
        self.total_steps, self.reached, self.grace, self.clock, self.me = total_steps, False, grace, clock, me
        self.unserved_since: float | None = None  # when no data node was first seen serving, since the last one was

    def over(self, nodes: dict[str, NodeRecord]) -> bool:
        self.reached = self.reached or any(r.state_version >= self.total_steps for r in nodes.values())
        if serving(nodes, "data"):
            self.unserved_since = None
            return False
        if not self.reached:
            return False
        if any(r.role == "data" and r.status == "leaving" for r in nodes.values()):
            return True
        if not any(r.status == "serving" for p, r in nodes.items() if p != self.me):
            return True  # nobody is left to keep the run up
        now = self.clock()
        self.unserved_since = now if self.unserved_since is None else self.unserved_since
        return now - self.unserved_since >= self.grace


@dataclass
class MembershipConfig:
    """How often a node refreshes its record and how long a record lives (`[membership]` in a run config)."""

    heartbeat_s: float = 1.0
    record_ttl_s: float = 8.0  # a loaded DHT can miss a few beats; calls that fail detect crashes sooner

    def __post_init__(self) -> None:
        if not self.heartbeat_s > 0:
            raise UserError(f"membership.heartbeat_s={self.heartbeat_s} must be positive (seconds)")
        if not self.record_ttl_s > self.heartbeat_s:
            raise UserError(
                f"membership.record_ttl_s={self.record_ttl_s} must exceed membership.heartbeat_s={self.heartbeat_s}, "
                "or live nodes would look dead between heartbeats"
            )


def check_model_hash(run: RunRecord, local_hash: str) -> None:
    if run.model_hash != local_hash:
        raise UserError(
            f"run {run.run_id} uses model hash {run.model_hash}, this node has {local_hash}: "
            "join with the run's preset and model overrides (see `gwtf status`), or join another run"
        )


class Membership(ABC):
    """Run and node records. Methods are blocking: call them from a thread or via asyncio.to_thread."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @abstractmethod
    def publish_run(self, rec: RunRecord) -> None: ...

    @abstractmethod
    def get_run(self, timeout: float) -> RunRecord | None:
        """The run record, waiting up to `timeout` seconds for it to become visible; None if it does not."""

    @abstractmethod
    def announce(self, rec: NodeRecord, ttl: float) -> None:
        """Write this node's record, valid for `ttl` seconds. Only the owner of a record can write it."""

    @abstractmethod
    def live_nodes(self) -> dict[str, NodeRecord]:
        """Unexpired node records by peer id."""

    @abstractmethod
    def live_records(self) -> dict[str, tuple[NodeRecord, float]]:
        """Unexpired node records by peer id, each with the seconds it has left (a node that missed its heartbeats
        has less than a TTL left)."""

    @abstractmethod
    def publish_telemetry(self, data: dict[str, Any], ttl: float) -> None:
        """Write this node's telemetry (gwtf.telemetry), valid for `ttl` seconds; only its owner can write it."""

    @abstractmethod
    def telemetry(self) -> dict[str, dict[str, Any]]:
        """Unexpired telemetry by the peer id of the node that wrote it."""

    @abstractmethod
    def announce_choice(self, choice: dict[str, Any], ttl: float) -> None:
        """Write this volunteer's choice of stage before it loads (gwtf.placement), valid for `ttl` seconds."""

    @abstractmethod
    def choices(self) -> dict[str, dict[str, Any]]:
        """Unexpired choices of volunteers by the peer id of the volunteer that wrote it."""

    def start_heartbeat(self, get_record: Callable[[], NodeRecord], period: float, ttl: float) -> None:
        """Announce `get_record()` every `period` seconds until `close()`."""
        if period <= 0 or ttl <= period:
            raise ValueError("heartbeat needs 0 < period < ttl, or records expire between beats")
        if self._heartbeat is not None:
            raise RuntimeError("heartbeat already running")
        beat = lifecycle.os_named(lifecycle.BEAT_THREAD, functools.partial(self._beat, get_record, period, ttl))
        self._heartbeat = threading.Thread(target=beat, name=lifecycle.BEAT_THREAD, daemon=True)
        self._heartbeat.start()

    def _beat(self, get_record: Callable[[], NodeRecord], period: float, ttl: float) -> None:
        while not self._stop.is_set():
            try:
                self.announce(get_record(), ttl)
            except Exception as exc:  # a missed beat is survivable (the ttl covers a few); a dead thread is not
                logger.warning(
                    "heartbeat: announce failed (%s: %s); next beat in %.1fs", type(exc).__name__, exc, period
                )
            self._stop.wait(period)

    def close(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=DHT_TIMEOUT_S)


# ---------------------------------------------------------------------------------------------------------------
# In memory


@dataclass
class MembershipStore:
    """What in-memory memberships of one process share: run records, (record, expiry, owner) per node, and
    (telemetry, expiry) per data node."""

    runs: dict[str, RunRecord] = field(default_factory=dict)
    nodes: dict[str, dict[str, tuple[NodeRecord, float, str | None]]] = field(default_factory=dict)
    telemetry: dict[str, dict[str, tuple[dict[str, Any], float]]] = field(default_factory=dict)  # (data, expiry)
    choices: dict[str, dict[str, tuple[dict[str, Any], float]]] = field(default_factory=dict)  # (choice, expiry)
    lock: threading.Lock = field(default_factory=threading.Lock)


class InMemoryMembership(Membership):
    """Membership over a shared `MembershipStore`. `peer_id` is the owner: it can only announce itself."""

    def __init__(
        self,
        store: MembershipStore,
        run_id: str,
        peer_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.store, self.run_id, self.peer_id, self.clock = store, run_id, peer_id, clock

    @staticmethod
    def shared_store() -> MembershipStore:
        return MembershipStore()

    def publish_run(self, rec: RunRecord) -> None:
        with self.store.lock:
            self.store.runs[rec.run_id] = dataclasses.replace(rec)

    def get_run(self, timeout: float) -> RunRecord | None:
        with self.store.lock:
            rec = self.store.runs.get(self.run_id)
        return dataclasses.replace(rec) if rec is not None else None

    def announce(self, rec: NodeRecord, ttl: float) -> None:
        if self.peer_id is not None and rec.peer_id != self.peer_id:
            raise PermissionError(f"{self.peer_id} cannot write the record of {rec.peer_id}")
        with self.store.lock:
            nodes = self.store.nodes.setdefault(self.run_id, {})
            previous = nodes.get(rec.peer_id)
            if previous is not None and previous[2] != self.peer_id:
                raise PermissionError(f"the record of {rec.peer_id} belongs to another writer")
            nodes[rec.peer_id] = (NodeRecord.from_dict(rec.to_dict()), self.clock() + ttl, self.peer_id)

    def live_nodes(self) -> dict[str, NodeRecord]:
        return {p: rec for p, (rec, _) in self.live_records().items()}

    def live_records(self) -> dict[str, tuple[NodeRecord, float]]:
        now = self.clock()
        with self.store.lock:
            nodes = self.store.nodes.get(self.run_id, {})
            return {
                p: (NodeRecord.from_dict(r.to_dict()), expiry - now)
                for p, (r, expiry, _) in nodes.items()
                if expiry > now
            }

    def publish_telemetry(self, data: dict[str, Any], ttl: float) -> None:
        if self.peer_id is None:
            raise PermissionError("a membership without a peer id (a watcher) publishes no telemetry")
        copied = json.loads(json.dumps(data))  # what a DHT would carry: plain values, no shared references
        with self.store.lock:
            self.store.telemetry.setdefault(self.run_id, {})[self.peer_id] = (copied, self.clock() + ttl)

    def telemetry(self) -> dict[str, dict[str, Any]]:
        return self._read(self.store.telemetry)

    def announce_choice(self, choice: dict[str, Any], ttl: float) -> None:
        if self.peer_id is None:
            raise PermissionError("a membership without a peer id (a watcher) announces no choice")
        with self.store.lock:
            self.store.choices.setdefault(self.run_id, {})[self.peer_id] = (dict(choice), self.clock() + ttl)

    def choices(self) -> dict[str, dict[str, Any]]:
        return self._read(self.store.choices)

    def _read(self, table: dict[str, dict[str, tuple[dict[str, Any], float]]]) -> dict[str, dict[str, Any]]:
        now = self.clock()
        with self.store.lock:
            found = table.get(self.run_id, {})
            return {p: json.loads(json.dumps(d)) for p, (d, expiry) in found.items() if expiry > now}


# ---------------------------------------------------------------------------------------------------------------
# hivemind DHT

_OWNER_KEYS: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def run_dht_keys(run_id: str) -> list[str]:
    """The run's DHT keys: its record, its nodes' records, its data nodes' telemetry, the stages volunteers chose
    before they load (all MAC'd in a keyed run)."""
    return [f"gwtf/{run_id}/run", f"gwtf/{run_id}/nodes", f"gwtf/{run_id}/telemetry", f"gwtf/{run_id}/choices"]


def make_dht(initial_peers: list[str] | None, loopback: bool = True, access: RunAccess | None = None, **kw: Any) -> Any:
    """A started DHT peer (gwtf.dht.ThreadDHT: hivemind's DHTNode on a thread of this process) whose libp2p identity
    is its record-signing RSA key (for `DHTMembership`).

    `loopback` keeps it on 127.0.0.1 without NAT traversal or relays (tests, demo, benchmarks); a person joining a
    real network passes loopback=False and their own host_maddrs. `access`: the run and its key, if keyed (its
    records then carry the key's MAC). Other keyword arguments go to hivemind's DHTNode and P2P.
    """
    import torch.multiprocessing
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey

    from gwtf.dht import ThreadDHT

    # Importing hivemind switched torch to "file_system" sharing (for its MPFutures between processes), which starts
    # a torch_shm_manager daemon (58 MB PSS measured here) beside any process that shares a tensor; torch's own
    # default, file descriptors, needs no daemon. The DHT needs neither now, but a node should not carry the daemon.
    torch.multiprocessing.set_sharing_strategy(os.environ.get(SHARING_ENV, "file_descriptor"))

    private_key = RSAPrivateKey()  # not the process-wide key: several nodes may share a process
    validator = RSASignatureValidator(private_key)
    validators = [validator, *kw.pop("record_validators", [])]
    if access is not None:
        validators.append(RunKeyValidator(access, run_dht_keys(access.run_id)))
    options = {**(LOOPBACK_KW if loopback else {}), **kw}
    with tempfile.TemporaryDirectory(prefix="gwtf-id-") as tmp:  # the daemon reads it at start, then it can go
        identity = _write_identity(private_key, os.path.join(tmp, "identity.key"))
        if os.environ.get(DHT_PROCESS_ENV) == "1":  # hivemind's own: the DHTNode in a forked process
            import hivemind

            make: Any = functools.partial(hivemind.DHT, start=True)
        else:
            make = ThreadDHT
        try:
            dht = make(
                initial_peers=initial_peers or None,
                record_validators=validators,
                identity_path=identity,
                check_if_identity_free=False,  # a fresh key: nobody else has it
                **options,
            )
        except Exception as exc:  # hivemind raises assorted errors for bad or unreachable addresses
            raise UserError(
                f"cannot start a DHT peer with initial peers {initial_peers}: {exc}; check the address"
            ) from exc
    _OWNER_KEYS[dht] = validator.local_public_key
    return dht


KEY_PROBE_AFTER_S = 3.0  # a keyed joiner that sees no run record this long checks whether its key is the run's


def check_invitation(initial_peers: list[str], access: RunAccess, timeout: float, loopback: bool = True,
                     **dht_kw: Any) -> RunRecord:  # fmt: skip
    """The run record as a live peer at `initial_peers` holds it, read by a short-lived DHT client with no key (it
    strips the records' MACs without checking them), and checked against `access`: a one-line UserError for a run
    that is not there, a key the run does not know, no key on a keyed run, or a key on an open run.

    A joiner calls this before it starts its own DHT peer. A client stores nothing and serves nobody, so a joiner
    that is refused has written nothing to the DHT and never became a DHT peer of the run: had it joined with the
    wrong key, its peer would refuse the run's records (their MACs are not its key's) and every member's store that
    reached it would be reported as refused (see DHTMembership._store).
    """
    probe = make_dht(initial_peers, loopback=loopback, access=RunAccess.open(access.run_id), client_mode=True,
                     **dht_kw)  # fmt: skip
    try:
        seen = DHTMembership(probe, access.run_id).get_run(timeout)
    finally:
        probe.shutdown()
    if seen is None:
        raise _not_found(access.run_id, initial_peers, timeout)
    check_run_access(access, seen.key_id)
    return seen


def _not_found(run_id: str, initial_peers: list[str], timeout: float) -> UserError:
    return UserError(
        f"run {run_id!r} not found via {initial_peers[0]} within {timeout:g}s: check --run and "
        "--initial-peers (the address `gwtf bootstrap` printed, of a live peer)"
    )


def find_run(dht: Any, initial_peers: list[str], access: RunAccess, timeout: float, loopback: bool = True) -> RunRecord:
    """The run record through `dht` (made with `access`), or a one-line UserError: the run is not there, or
    `access`'s key is not the run's. A DHT peer with the wrong key drops the run's records as forgeries, so it
    would only ever see "not found": after KEY_PROBE_AFTER_S a keyed reader checks its key (check_invitation).
    """
    membership = DHTMembership(dht, access.run_id)
    first = min(timeout, KEY_PROBE_AFTER_S) if access.keyed else timeout
    record = membership.get_run(first)
    if record is None and access.keyed:
        check_invitation(initial_peers, access, min(5.0, timeout), loopback=loopback)
        record = membership.get_run(max(0.0, timeout - first))
    if record is None:
        raise _not_found(access.run_id, initial_peers, timeout)
    check_run_access(access, record.key_id)
    return record


def _write_identity(private_key: Any, path: str) -> str:
    """The key as a libp2p identity file (protobuf PrivateKey, RSA, DER), so the peer id is derived from it."""
    from hivemind.proto import crypto_pb2

    proto = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=private_key.to_bytes())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(proto.SerializeToString())
    return path


def peer_id_of_owner(subkey: Any) -> str | None:
    """The libp2p peer id (base58) of the RSA key in an `[owner:ssh-rsa ...]` subkey; None if there is none.

    libp2p: peer id = multihash sha2-256 of the protobuf PublicKey {RSA, DER SubjectPublicKeyInfo}.
    """
    import base58
    from cryptography.hazmat.primitives import serialization
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.proto import crypto_pb2

    if not isinstance(subkey, bytes):
        return None
    found = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey)
    if len(found) != 1:
        return None
    try:
        public = serialization.load_ssh_public_key(found[0])
    except (ValueError, TypeError):
        return None
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
    digest = hashlib.sha256(proto).digest()
    return str(base58.b58encode(bytes([0x12, len(digest)]) + digest).decode())


def dht_addresses(dht: Any) -> list[str]:
    """The multiaddrs others pass as --initial-peers to reach this DHT peer."""
    return [str(m) for m in dht.get_visible_maddrs()]


class DHTMembership(Membership):
    """Records in hivemind's DHT: key `gwtf/<run>/nodes`, one subkey per node carrying the node's public key."""

    def __init__(self, dht: Any, run_id: str, owner_key: bytes | None = None) -> None:
        super().__init__()
        self.dht, self.run_id = dht, run_id
        key = owner_key if owner_key is not None else _OWNER_KEYS.get(dht)
        if key is None:
            raise ValueError("DHTMembership needs a DHT from make_dht (or its validator's owner_key)")
        self.owner_key = key
        self.peer_id = peer_id_of_owner(key)
        self._run_key, self._nodes_key, self._telemetry_key, self._choices_key = run_dht_keys(run_id)

    def _store(self, key: str, value: dict[str, Any], ttl: float) -> None:
        """Store `value` under this node's subkey, tried STORE_ATTEMPTS times; then RuntimeError, which every caller
        logs and survives (a heartbeat beats again, the bootstrap refreshes again). hivemind reports a store as the
        answer of the replica that answered last, so a DHT peer that refuses the run's records (one with another run
        key) makes a store the other replicas kept look refused: gwtf joiners check their key before they become DHT
        peers (check_invitation), so only a peer running other code can cause that."""
        from hivemind.utils import get_dht_time

        for attempt in range(STORE_ATTEMPTS):
            DHT_OPS.add("write", key)
            future = self.dht.store(key, value, get_dht_time() + ttl, subkey=self.owner_key, return_future=True)
            if future.result(timeout=DHT_TIMEOUT_S):
                return
            logger.debug("DHT store of %s was refused or reached no peer (attempt %d)", key, attempt + 1)
        raise RuntimeError(f"DHT store of {key} was refused or reached no peer ({STORE_ATTEMPTS} attempts)")

    def _get_subkeys(self, key: str) -> dict[Any, Any]:
        return {sub: value for sub, (value, _) in self._get_expiring(key).items()}

    def _get_expiring(self, key: str) -> dict[Any, tuple[Any, float]]:
        """Unexpired values under `key` by subkey, each with the seconds it has left."""
        from hivemind.utils import get_dht_time

        DHT_OPS.add("read", key)
        found = self.dht.get(key, latest=True, return_future=True).result(timeout=DHT_TIMEOUT_S)
        if found is None or not isinstance(found.value, dict):
            return {}
        now = get_dht_time()
        items = found.value.items()
        return {sub: (item.value, item.expiration_time - now) for sub, item in items if item.expiration_time > now}

    def publish_run(self, rec: RunRecord) -> None:
        self._store(self._run_key, dataclasses.asdict(rec), RUN_TTL_S)

    def get_run(self, timeout: float) -> RunRecord | None:
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:  # the record may not have propagated yet right after bootstrap
            records = [v for v in self._get_subkeys(self._run_key).values() if isinstance(v, dict)]
            if records:
                if len(records) > 1:
                    logger.warning("run %s has %d run records; using the oldest", self.run_id, len(records))
                names = {f.name for f in dataclasses.fields(RunRecord)}
                oldest = min(records, key=lambda r: r.get("created", 0.0) if isinstance(r.get("created"), float) else 0)
                try:
                    return RunRecord(**{k: v for k, v in oldest.items() if k in names})
                except TypeError as exc:
                    msg = f"run {self.run_id} has a malformed run record ({exc}); bootstrap it again"
                    raise UserError(msg) from None
            if time.monotonic() + delay > deadline:
                return None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def announce(self, rec: NodeRecord, ttl: float) -> None:
        if rec.peer_id != self.peer_id:
            raise PermissionError(f"{self.peer_id} cannot write the record of {rec.peer_id}")
        self._store(self._nodes_key, rec.to_dict(), ttl)

    def live_nodes(self) -> dict[str, NodeRecord]:
        return {p: rec for p, (rec, _) in self.live_records().items()}

    def live_records(self) -> dict[str, tuple[NodeRecord, float]]:
        nodes = {}
        for subkey, (value, left) in self._get_expiring(self._nodes_key).items():
            try:
                rec = NodeRecord.from_dict(value)
            except (TypeError, ValueError) as exc:
                logger.warning("ignoring a malformed node record: %s", exc)
                continue
            owner = peer_id_of_owner(subkey)
            if rec.peer_id != owner:  # signed by one key, claiming another peer's identity
                logger.warning("ignoring a record claiming peer %s, written by %s", rec.peer_id, owner)
                continue
            nodes[rec.peer_id] = (rec, left)
        return nodes

    def publish_telemetry(self, data: dict[str, Any], ttl: float) -> None:
        self._store(self._telemetry_key, data, ttl)  # under this node's own subkey, signed like its record

    def telemetry(self) -> dict[str, dict[str, Any]]:
        """By the peer id the writer's subkey proves (a value's own claims are not trusted)."""
        return self._by_owner(self._telemetry_key)

    def announce_choice(self, choice: dict[str, Any], ttl: float) -> None:
        self._store(self._choices_key, choice, ttl)

    def choices(self) -> dict[str, dict[str, Any]]:
        return self._by_owner(self._choices_key)

    def _by_owner(self, key: str) -> dict[str, dict[str, Any]]:
        found = {}
        for subkey, value in self._get_subkeys(key).items():
            owner = peer_id_of_owner(subkey)
            if owner is not None and isinstance(value, dict):
                found[owner] = value
        return found
