"""Replicas identical, checked: after every step each replica of a stage replies `stepped` with a hash of its
weights; a data node compares the hashes of each stage and has a replica whose hash differs from its stage's
majority download the state of a majority replica (`resync`), before the next iteration routes through it.

Replicas of a stage step bit-identical averaged gradients from bit-identical weights, so their hashes agree unless
something went wrong: a replica left out of a round that stepped on its own, a corrupted download, or replicas on
different devices (CUDA's AdamW kernels are not bit-identical with the CPU's). A warning is not enough there: a
joiner or a CheckFree neighbour trusts any replica's state, so the odd one is overwritten.

Stage 0 (embeddings, final norm, LM head) has one replica per data node, averaged among the data nodes; they check
it the same way (`Stage0Hashes`): after stepping, each asks the others for their stage-0 hash at the new version,
takes the same majority (the same tie rule), and the one that differs downloads stage 0 from the majority itself.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gwtf.errors import BadMessage, PeerError
from gwtf.lora import trainable_names
from gwtf.runtime.state import fetch_state, state_wait
from gwtf.stage import state_bytes
from gwtf.transport import Message

if TYPE_CHECKING:
    from gwtf.runtime.datanode import DataNode

log = logging.getLogger(__name__)


def majority(hashes: dict[str, str]) -> str:
    """The hash most replicas hold; a tie goes to the hash of the lowest peer id among the tied ones (the averaging
    leader's, whose result every member stepped: with two replicas there is no majority to ask)."""
    counts = collections.Counter(hashes.values())
    top = max(counts.values())
    tied = {h for h, c in counts.items() if c == top}
    return next(hashes[p] for p in sorted(hashes) if hashes[p] in tied)


def diverged(digests: dict[str, tuple[int, str]]) -> dict[str, tuple[str, list[str]]]:
    """From {replica: (stage, weights hash)}: {replica whose hash differs from its stage's majority: (the majority
    hash, the replicas that hold it)}."""
    by_stage: dict[int, dict[str, str]] = {}
    for peer, (stage, digest) in digests.items():
        by_stage.setdefault(stage, {})[peer] = digest
    out = {}
    for hashes in by_stage.values():
        best = majority(hashes)
        donors = sorted(p for p, h in hashes.items() if h == best)
        out.update({p: (best, donors) for p, h in hashes.items() if h != best})
    return out


def reported(iteration: int, replies: dict[str, Message], stages: dict[str, int]) -> dict[str, tuple[int, str]]:
    """{replica: (its stage, the weight hash its `stepped` reply for `iteration` carries)}; a reply of another version
    (stale) or without a hash is left out."""
    return {
        p: (stages[p], r.meta["hash"])
        for p, r in replies.items()
        if p in stages and isinstance(r.meta.get("hash"), str) and r.meta.get("version") == iteration + 1
    }


def weight_hashes(iteration: int, replies: dict[str, Message], stages: dict[str, int]) -> dict[int, tuple[int, int]]:
    """{stage: (replicas whose `stepped` reply for `iteration` carries a weight hash, distinct hashes among them)};
    one distinct hash: the stage's replicas are identical (before any resync)."""
    seen: dict[int, list[str]] = {}
    for stage, digest in reported(iteration, replies, stages).values():
        seen.setdefault(stage, []).append(digest)
    return {stage: (len(hashes), len(set(hashes))) for stage, hashes in sorted(seen.items())}


async def resync_diverged(
    call: Callable[[str, Message], Awaitable[Message]],
    run_id: str,
    iteration: int,
    replies: dict[str, Message],
    stages: dict[str, int],
) -> dict[str, str]:
    """Compare the `stepped` replies' hashes per stage; have each odd replica resynchronise from its stage's
    majority and wait for it (every call bounded by `call`). {peer: its hash afterwards, or why it failed}."""
    digests = reported(iteration, replies, stages)
    odd = diverged(digests)
    if not odd:
        return {}
    for peer, (best, donors) in sorted(odd.items()):
        log.warning("iteration %d: stage %d replica %s has weights %s, the majority %s (%d replicas): resyncing",
                    iteration, stages[peer], peer[:8], digests[peer][1][:8], best[:8], len(donors))  # fmt: skip
    msgs = {p: Message(kind="resync", run_id=run_id, iteration=iteration + 1, meta={"donors": d, "hash": h})
            for p, (h, d) in odd.items()}  # fmt: skip
    results = await asyncio.gather(*(call(p, m) for p, m in msgs.items()), return_exceptions=True)
    out = {}
    for peer, r in zip(msgs, results, strict=True):
        if isinstance(r, BaseException):
            log.warning("iteration %d: replica %s did not resync (%s)", iteration, peer[:8], r)
            out[peer] = f"failed: {r}"
        else:
            out[peer] = str(r.meta.get("hash"))
    return out


STAGE0_POLL_S = 0.05  # a data node asked for a version it has not stepped to yet looks again this often


class Stage0Hashes:
    """Stage 0's replicas, one per data node, checked after every step as relay stages are: a data node whose stage
    0 differs from the data nodes' majority downloads it (weights and Adam moments) from the majority's holders
    before its next iteration. Each data node decides for itself from the same hashes, so none is told to."""

    def __init__(self, node: DataNode):
        self.node = node
        self.own: tuple[int, str] | None = None  # (version, this node's stage-0 hash at it)
        self.loads = 0  # resyncs so far: a hash computed across one is not kept

    def handlers(self) -> dict[str, Callable[[Message], Awaitable[Message]]]:
        return {"stage0_hash": self.rpc_stage0_hash}

    async def rpc_stage0_hash(self, msg: Message) -> Message:
        """This node's stage-0 hash once it holds version `msg.iteration` (the asker may step first: wait for the
        step, bounded by the call timeout); the version it holds, whichever it is, is in the reply."""
        node = self.node
        deadline = time.monotonic() + node.run.transport.call_timeout / 2
        while node.stage0.version < msg.iteration and time.monotonic() < deadline:
            await asyncio.sleep(STAGE0_POLL_S)
        version, digest = await self._own()
        return node.message("stage0_hash", meta={"hash": digest, "version": version})

    async def _own(self) -> tuple[int, str]:
        """(version, this node's stage-0 hash), hashed once per version: its own check and every other data node's
        question ask for it after each step. Version and hash are read together in the compute thread, where the
        optimizer steps; a resync (same version, other weights) drops it."""
        stage0, loads = self.node.stage0, self.loads
        if self.own is not None and self.own[0] == stage0.version:
            return self.own
        own = await self.node.compute(lambda: (stage0.version, stage0.weights_digest()))
        if loads == self.loads:
            self.own = own
        return own

    async def check(self, iteration: int, data_nodes: list[str]) -> tuple[tuple[int, int] | None, int]:
        """After stepping stage 0 to version iteration + 1: ((data nodes whose hash was compared, distinct hashes),
        1 if this node resynchronised else 0). Nothing to compare (None) with no other data node."""
        node = self.node
        others = [p for p in data_nodes if p != node.peer_id]
        if not others:
            return None, 0
        ask = node.message("stage0_hash", iteration=iteration + 1)
        replies = await asyncio.gather(*(node.call(p, "stage0_hash", ask) for p in others), return_exceptions=True)
        hashes = {node.peer_id: (await self._own())[1]}
        for peer, reply in zip(others, replies):
            if isinstance(reply, BaseException):
                log.info("iteration %d: no stage-0 hash from data node %s (%s)", iteration, peer[:8], reply)
            elif reply.meta.get("version") == iteration + 1 and isinstance(reply.meta.get("hash"), str):
                hashes[peer] = reply.meta["hash"]
        counts = (len(hashes), len(set(hashes.values())))
        odd = diverged({p: (0, h) for p, h in hashes.items()}).get(node.peer_id)
        if odd is None:
            return counts, 0
        best, donors = odd
        log.warning("iteration %d: data node %s has stage 0 %s, the majority %s (%d data nodes): resyncing",
                    iteration, node.peer_id[:8], hashes[node.peer_id][:8], best[:8], len(donors))  # fmt: skip
        return counts, int(await self._resync(iteration + 1, donors, best))

    async def _resync(self, version: int, donors: list[str], best: str) -> bool:
        """Download stage 0 at `version` from `donors` and load it; True when its hash is then the majority's."""
        node, stage0 = self.node, self.node.stage0
        sizes = state_bytes(stage0.module)
        names = trainable_names(stage0.module) or [n for n, _ in stage0.module.named_parameters()]
        wait = state_wait(node.run.iteration, sizes, names, len(donors))

        async def get(peer: str, msg: Message) -> Message:
            return await node.call(peer, "get_state", msg, timeout=wait)

        try:
            tensors, meta = await fetch_state(get, node.spec.run_id, donors, names, sizes)
            if meta["version"] != version:  # a donor stepped on without this node: it is behind, not odd
                raise BadMessage(f"the donors hold version {meta['version']}, not {version}")
            self.own, self.loads = None, self.loads + 1  # the weights change at the same version
            await node.compute(stage0.load_state, tensors, meta)
        except (PeerError, BadMessage) as exc:
            log.warning("data node %s: stage 0 did not resync (%s)", node.peer_id[:8], exc)
            return False
        digest: Any = (await self._own())[1]
        if digest != best:
            log.warning("data node %s: stage 0 resynced to %s, not the majority's %s", node.peer_id[:8], digest[:8],
                        best[:8])  # fmt: skip
            return False
        log.info("data node %s: stage 0 resynced from %s", node.peer_id[:8], donors[0][:8])
        return True
