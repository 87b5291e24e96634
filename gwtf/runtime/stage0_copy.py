"""Stage 0 outlives its data nodes: after its steps a data node hands its stage 0 (embedding, final norm, head, their
optimizer moments, its version: the run's step) to the replicas of the first and the last relay stage, and a data
node that starts with no live data node ahead of it takes the newest copy from them.

Why relays of the edge stages: every data node talks to them each step anyway (the embeddings go to stage 1, the head
takes stage S's output), they hold no other copy of stage 0, and with both a run survives losing every data node and
every replica of one of them at once (with stage 1 alone, that lost stage 0; the lost relay stage is rebuilt by the
run's recovery). CheckFree+ keeps the embeddings on the edge stages too, but trains them there; this keeps them exact.
The copy is handed on in the background after the data node's optimizer step, off the step's critical path, and a
step's copy is skipped while the last one is still on its way, and after it for as long as keeps the copies to
`iteration.stage0_copy_share` of the wall time (DataNode._hand_on_copy): at real sizes it is the step's largest
transfer (a 124m stage 0 and its two Adam moments are 563 MB per keeper: 30 s at 150 Mbit/s, longer than a step), so
awaiting it made every step wait for it, and sent back to back the copies held half of the data node's links all the
time. The price: a copy may lag the relays by the steps its transfer and its rest took. A new data node that takes
a copy older than the relays' version takes their version without the updates in between (StageReplica.skip_to:
stage 0 loses those optimizer steps, as a relay stage does when no replica of a step's update is left,
DataNode._advance_stale); the loss goes on from there. At most KEEPERS_PER_STAGE replicas
of each edge stage keep it, so its cost does not grow with the replicas. Cost: stage 0's state (parameters and two
Adam moments, fp32) per copy to each keeper (sent to all at once).

The state travels in parts of at most COPY_CHUNK_BYTES (the size of a state download's part, gwtf.stage) and 63
tensors. State downloads cut by parameter (gwtf.sizing.chunk_by_bytes); the copy cuts inside tensors too, as a 124m
stage 0 holds two 32000 x 768 matrices whose state (the weights and two Adam moments) is 281 MB each: its 563 MB
travel in 9 parts of at most 64 MB. A keeper assembles the parts of one version beside the copy it
holds and swaps them in once all have come, so a data node that dies mid-copy leaves the previous whole copy; a
new data node reads the parts from keepers that hold the newest version.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from gwtf.errors import BadMessage, PeerError
from gwtf.membership import NodeRecord, serving
from gwtf.stage import STATE_CHUNK_BYTES
from gwtf.transport import Message

if TYPE_CHECKING:
    from gwtf.runtime.node import NodeBase

log = logging.getLogger(__name__)

COPY_CHUNK_BYTES = STATE_CHUNK_BYTES  # one part of the copy: no more bytes than one part of a state download
MAX_PARTS = 4096  # parts of one copy a keeper accepts (64 GiB at the default part size)
KEEPERS_PER_STAGE = 2  # replicas of each edge stage (1 and S) that keep the copy: any one of them is enough
MAX_PART_TENSORS = 63  # slices in one part (a message carries at most 64 tensors: gwtf.transport.MessageLimits)


Piece = tuple[str, int, int]  # (state key, first element, element past the last) of the flattened tensor


@dataclass
class Copy:
    """One version of stage 0's state, in the parts it came in: `parts[i]` = (pieces, their tensors), 1-D slices of
    the flattened state tensors; `meta` the state's meta (version, steps, lr_scale, ...) and `shapes` (key -> shape)."""

    version: int
    count: int
    parts: dict[int, tuple[list[Piece], list[torch.Tensor]]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def whole(self) -> bool:
        return len(self.parts) == self.count


def copy_parts(tensors: dict[str, torch.Tensor], chunk_bytes: int = COPY_CHUNK_BYTES) -> list[list[Piece]]:
    """Stage 0's state cut into the parts of a copy: slices of the flattened tensors, each part at most `chunk_bytes`
    and MAX_PART_TENSORS slices (at least one element each). A tensor larger than a part is cut across parts (a 124m
    embedding and each of its moments are 94 MB), so no message is larger than `chunk_bytes`."""
    parts: list[list[Piece]] = []
    part: list[Piece] = []
    room = chunk_bytes
    for key, t in tensors.items():
        lo, n, size = 0, t.numel(), t.element_size()
        while lo < n or (n == 0 and lo == 0):
            if part and (room < size or len(part) >= MAX_PART_TENSORS):
                parts.append(part)
                part, room = [], chunk_bytes
            hi = min(n, lo + max(room // size, 1))
            part.append((key, lo, hi))
            room -= (hi - lo) * size
            lo = hi
            if n == 0:
                break
    if part:
        parts.append(part)
    return parts


def _slices(tensors: dict[str, torch.Tensor], pieces: list[Piece]) -> list[torch.Tensor]:
    return [tensors[key].reshape(-1)[lo:hi] for key, lo, hi in pieces]


def _pieces(msg: Message) -> list[Piece]:
    """The slices a copy's part says its tensors are: one per tensor, each a 1-D run of the named key's elements."""
    raw = msg.meta.get("pieces")
    if not isinstance(raw, list) or len(raw) != len(msg.tensors):
        raise BadMessage("a part of stage 0's copy needs one piece [key, first, past last] per tensor")
    pieces = []
    for entry, t in zip(raw, msg.tensors, strict=True):
        ok = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
        if not ok or not all(type(v) is int for v in entry[1:]) or not 0 <= entry[1] <= entry[2]:
            raise BadMessage("a piece of stage 0's copy must be [key, first, past last]")
        if t.dim() != 1 or t.numel() != entry[2] - entry[1]:
            raise BadMessage("a piece of stage 0's copy must be 1-D and as long as it says")
        pieces.append((entry[0], entry[1], entry[2]))
    return pieces


def _assemble(parts: list[tuple[list[Piece], list[torch.Tensor]]], shapes: dict) -> dict[str, torch.Tensor]:
    """The state tensors back from their slices; every element of every shape must be covered exactly once."""
    flat: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    for pieces, tensors in parts:
        for (key, lo, hi), t in zip(pieces, tensors, strict=True):
            shape = shapes.get(key)
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise BadMessage(f"no shape for {key} in stage 0's copy")
            n = int(torch.Size(shape).numel())
            if key not in flat:
                flat[key] = torch.empty(n, dtype=t.dtype)
            if hi > n or t.dtype != flat[key].dtype:
                raise BadMessage(f"a piece of {key} outside its shape, or of another dtype")
            flat[key][lo:hi] = t
            filled[key] = filled.get(key, 0) + hi - lo
    for key, shape in shapes.items():
        if filled.get(key) != int(torch.Size(shape).numel()):
            raise BadMessage(f"stage 0's copy covers {filled.get(key, 0)} elements of {key}, not its {shape}")
    return {key: flat[key].reshape(shapes[key]) for key in shapes}


class Stage0Keeper:
    """A relay's copy of stage 0: the newest whole version a data node pushed (`keep_stage0`, part by part), served
    part by part to a new data node (`get_stage0`)."""

    def __init__(self, node: NodeBase) -> None:
        self.node = node
        self.copy: Copy | None = None  # the newest whole copy
        self.pending: Copy | None = None  # a newer one whose parts are arriving

    def handlers(self) -> dict:
        return {"keep_stage0": self.rpc_keep_stage0, "get_stage0": self.rpc_get_stage0}

    async def rpc_keep_stage0(self, msg: Message) -> Message:
        nodes = await self.node.live_nodes()
        if msg.sender not in serving(nodes, "data"):
            raise BadMessage("only a serving data node hands on stage 0")
        raw = [msg.meta.get(k) for k in ("version", "part", "parts")]
        ints = [v for v in raw if isinstance(v, int) and not isinstance(v, bool)]
        if len(ints) != len(raw) or not 0 <= ints[1] < ints[2] <= MAX_PARTS:
            raise BadMessage(f"keep_stage0 needs an int version and part < parts <= {MAX_PARTS}")
        version, part, count = ints
        if not isinstance(msg.meta.get("shapes"), dict) or not isinstance(msg.meta.get("steps"), dict):
            raise BadMessage("keep_stage0 needs the state's shapes and steps")
        pieces = _pieces(msg)
        if not all(bool(torch.isfinite(t).all()) for t in msg.tensors):
            raise BadMessage("keep_stage0: tensors must be finite")
        if self.copy is not None and version <= self.copy.version:
            return self._ack()  # as new as what is kept, or older: nothing to do
        if self.pending is not None and version < self.pending.version:
            return self._ack()  # a late part of an older copy
        if self.pending is None or version > self.pending.version or count != self.pending.count:
            self.pending = Copy(version, count)
        pending = self.pending
        pending.parts[part] = (pieces, list(msg.tensors))
        pending.meta = {k: v for k, v in msg.meta.items() if k not in ("pieces", "part", "parts")}
        if pending.whole:
            self.copy, self.pending = pending, None
        return self._ack()

    def _ack(self) -> Message:
        return self.node.message("ack", meta={"version": self.copy.version if self.copy is not None else -1})

    async def rpc_get_stage0(self, msg: Message) -> Message:
        copy, part = self.copy, msg.meta.get("part", 0)
        if copy is None:
            raise BadMessage("this relay holds no copy of stage 0")
        if type(part) is not int or part not in copy.parts:
            raise BadMessage(f"the copy of stage 0 has parts 0..{copy.count - 1}")
        pieces, tensors = copy.parts[part]
        meta = {**copy.meta, "pieces": [list(p) for p in pieces], "part": part, "parts": copy.count}
        return self.node.message("stage0", tensors=list(tensors), meta=meta)


def keepers(node: NodeBase, nodes: dict[str, NodeRecord]) -> list[str]:
    """The serving relays that keep stage 0's copy: up to KEEPERS_PER_STAGE replicas of stage 1 and of the last stage
    (the first by peer id, so every data node hands its copy to the same ones)."""
    relays = serving(nodes, "relay")
    chosen = set()
    for edge in {1, node.spec.model.n_stages}:
        chosen.update(sorted(p for p, r in relays.items() if r.stage == edge)[:KEEPERS_PER_STAGE])
    return sorted(chosen)


def holders(node: NodeBase, nodes: dict[str, NodeRecord]) -> list[str]:
    """Every serving replica of an edge stage: those a new data node asks for a copy (the keepers change as replicas
    come and go, and an earlier keeper may hold the newest copy)."""
    edges = {1, node.spec.model.n_stages}
    return sorted(p for p, r in serving(nodes, "relay").items() if r.stage in edges)


async def push_copy(
    node: NodeBase,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    nodes: dict[str, NodeRecord],
    chunk_bytes: int | None = None,
) -> int:
    """Hand stage 0's state (`StageReplica.state()`) to the keepers (`keepers`) in parts of at most
    `chunk_bytes` (default COPY_CHUNK_BYTES); returns how many kept it whole. Each part is one bounded call (its
    bytes at the run's floor bandwidth); the replicas are sent to at once, the parts to one replica in order; a
    replica that fails is logged and skipped, the step goes on."""
    parts = copy_parts(tensors, chunk_bytes or COPY_CHUNK_BYTES)
    peers = keepers(node, nodes)
    shapes = {key: list(t.shape) for key, t in tensors.items()}

    async def send(peer: str) -> None:
        for i, pieces in enumerate(parts):
            part_meta = {**meta, "shapes": shapes, "pieces": [list(p) for p in pieces], "part": i, "parts": len(parts)}
            await node.call(peer, "keep_stage0", node.message("keep_stage0", tensors=_slices(tensors, pieces),
                                                              meta=part_meta))  # fmt: skip

    replies = await asyncio.gather(*(send(p) for p in peers), return_exceptions=True)
    for peer, reply in zip(peers, replies, strict=True):
        if isinstance(reply, BaseException):
            log.info("stage 0's copy to relay %s failed (%s)", peer[:8], reply)
    return sum(not isinstance(r, BaseException) for r in replies)


async def newest_copy(node: NodeBase, nodes: dict[str, NodeRecord]) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The newest copy of stage 0 that the keepers hold (None if none does): its first part from every keeper, the
    rest from a keeper of the newest version (the next one if a part fails)."""
    peers = holders(node, nodes)
    firsts = await asyncio.gather(*(_get_part(node, p, 0) for p in peers), return_exceptions=True)
    found = []
    for peer, reply in zip(peers, firsts, strict=True):
        if isinstance(reply, Message) and type(reply.meta.get("version")) is int:
            found.append((reply.meta["version"], peer, reply))
        else:
            log.info("relay %s has no copy of stage 0 (%s)", peer[:8], reply)
    for version, peer, first in sorted(found, key=lambda f: (-f[0], f[1])):
        try:
            return await _whole(node, peer, first, version)
        except (PeerError, BadMessage) as exc:
            log.warning("the copy of stage 0 at relay %s failed (%s); trying another", peer[:8], exc)
    return None


async def _get_part(node: NodeBase, peer: str, part: int) -> Message:
    return await node.call(peer, "get_stage0", node.message("get_stage0", meta={"part": part}))


async def _whole(node: NodeBase, peer: str, first: Message, version: int) -> tuple[dict[str, torch.Tensor], dict]:
    count = first.meta.get("parts", 1)
    if type(count) is not int or not 1 <= count <= MAX_PARTS:
        raise BadMessage("a copy of stage 0 with a bad part count")
    replies = [first]
    for part in range(1, count):  # in order: a 124m copy is 9 parts; a new data node waits for them anyway
        replies.append(await _get_part(node, peer, part))
    if any(r.meta.get("version") != version for r in replies):
        raise BadMessage("the parts of a copy of stage 0 are of different versions")
    shapes = first.meta.get("shapes")
    if not isinstance(shapes, dict):
        raise BadMessage("a copy of stage 0 without its shapes")
    tensors = _assemble([(_pieces(r), list(r.tensors)) for r in replies], shapes)
    meta = {k: v for k, v in first.meta.items() if k not in ("pieces", "part", "parts", "shapes")}
    return tensors, meta
