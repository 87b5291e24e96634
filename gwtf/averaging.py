"""Same-stage gradient averaging, weighted by the microbatches each replica processed.

Every member of a group (the live replicas of one stage, or the data nodes for stage 0) holds an unscaled
gradient sum and a count. The member with the lowest peer id leads: the others push (sum, count) to it, it waits
for the members it expects (bounded by a timeout, then goes on without the missing ones), reduces in peer-id order
and answers every push with the same tensors, so all replicas step identical gradients and keep identical weights.
A leader that dies is skipped: pushers move on to the next lowest id. A late push gets the finished result (its own
contribution left out, its weights still in agreement).

Why not hivemind's DecentralizedAverager: its all-reduce splits tensors into parts reduced by different peers, so
replicas end up with results that differ in the last bits, and its matchmaking costs seconds per round. Stage groups
here are small (a few replicas), and exact agreement is what lets a joiner or a CheckFree neighbour trust any
replica's state, so a leader reduce over the same transport as the activations is simpler and exact.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch

from gwtf.errors import BadMessage, PeerError
from gwtf.transport import Message, Transport

log = logging.getLogger(__name__)


@dataclass
class _Round:
    contributions: dict[str, tuple[list[torch.Tensor], int]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    result: asyncio.Future | None = None


@dataclass
class AverageResult:
    grads: list[torch.Tensor]
    total_count: int
    participants: list[str]


class GroupAverager:
    """Leader reduce of (gradient sum, count) among a group of peers over the node's transport."""

    def __init__(self, transport: Transport, run_id: str, group: str, timeout: float = 10.0, keep_rounds: int = 4):
        self.transport, self.run_id, self.group, self.timeout = transport, run_id, group, timeout
        self.keep_rounds = keep_rounds
        self.rounds: dict[int, _Round] = {}
        transport.add_handler(f"avg_{group}", self._rpc_push)

    def _round(self, iteration: int) -> _Round:
        if iteration not in self.rounds:
            self.rounds[iteration] = _Round(result=asyncio.get_running_loop().create_future())
            for old in sorted(self.rounds)[: -self.keep_rounds]:
                del self.rounds[old]
        return self.rounds[iteration]

    async def average(self, iteration: int, grads: list[torch.Tensor], count: int, members: list[str]) -> AverageResult:
        """Average with `members` (this peer included or not); returns the same result on every member."""
        candidates = sorted(set(members) | {self.transport.peer_id})
        for leader in candidates:  # bounded: each failed leader is skipped once
            if leader == self.transport.peer_id:
                return await self._lead(iteration, grads, count, candidates)
            try:
                return await self._push(leader, iteration, grads, count)
            except PeerError as exc:
                log.warning(
                    "%s averaging round %d: leader %s failed (%s); next one", self.group, iteration, leader, exc
                )
        raise PeerError(f"{self.group} averaging round {iteration}: no leader answered")

    async def _push(self, leader: str, iteration: int, grads: list[torch.Tensor], count: int) -> AverageResult:
        msg = Message(kind="avg", run_id=self.run_id, iteration=iteration, tensors=grads, meta={"count": count})
        reply = await self.transport.call(leader, f"avg_{self.group}", msg, timeout=2 * self.timeout)
        return AverageResult(reply.tensors, int(reply.meta["total_count"]), list(reply.meta["participants"]))

    async def _lead(self, iteration: int, grads: list[torch.Tensor], count: int, members: list[str]) -> AverageResult:
        rnd = self._round(iteration)
        rnd.contributions[self.transport.peer_id] = (grads, count)
        deadline = time.monotonic() + self.timeout
        while not set(members) <= set(rnd.contributions) and time.monotonic() < deadline:
            rnd.arrived.clear()
            try:
                await asyncio.wait_for(rnd.arrived.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
        missing = sorted(set(members) - set(rnd.contributions))
        if missing:
            log.warning("%s averaging round %d: going on without %s", self.group, iteration, missing)
        result = _reduce(rnd.contributions)
        assert rnd.result is not None
        rnd.result.set_result(result)
        return result

    async def _rpc_push(self, msg: Message) -> Message:
        rnd = self._round(msg.iteration)
        assert rnd.result is not None
        if not rnd.result.done():
            count = msg.meta.get("count")
            if not isinstance(count, int) or count < 0:
                raise BadMessage(f"averaging push needs a non-negative integer count, got {count!r}")
            rnd.contributions[msg.sender] = (msg.tensors, count)
            rnd.arrived.set()
        result: AverageResult = await asyncio.wait_for(asyncio.shield(rnd.result), timeout=2 * self.timeout)
        meta = {"total_count": result.total_count, "participants": result.participants}
        return Message(kind="avg", run_id=self.run_id, iteration=msg.iteration, tensors=result.grads, meta=meta)


def _reduce(contributions: dict[str, tuple[list[torch.Tensor], int]]) -> AverageResult:
    """sum(grads) / sum(counts), summed in peer-id order so the result does not depend on arrival order."""
    peers = sorted(contributions)
    shapes = [tuple(t.shape) for t in contributions[peers[0]][0]]
    for p in peers:
        if [tuple(t.shape) for t in contributions[p][0]] != shapes:
            raise BadMessage(f"averaging: {p} sent gradients of other shapes")
    total = sum(contributions[p][1] for p in peers)
    sums = [torch.zeros_like(t) for t in contributions[peers[0]][0]]
    for p in peers:
        for acc, g in zip(sums, contributions[p][0]):
            acc.add_(g)
    scale = 1.0 / max(total, 1)
    return AverageResult([s.mul_(scale) for s in sums], total, peers)
