"""A relay's iteration end: once every live data node is done with iteration i, the stage's replicas average their
gradients (weighted by the microbatches each processed) with exactly the group the data nodes named, and step.
Each replica answers `stepped` with a hash of its weights; one the data nodes find off its stage's majority is told
to `resync` (gwtf.runtime.consistency)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from gwtf.errors import BadMessage
from gwtf.membership import serving
from gwtf.runtime.joining import RelayJoining
from gwtf.sizing import transfer_s
from gwtf.transport import Message

log = logging.getLogger(__name__)


def _peers_of(by_stage: Any, stage: int) -> set[str]:
    """The peer ids listed for `stage` in a {stage: [peer, ...]} map from a message (anything malformed: none)."""
    peers = by_stage.get(str(stage), []) if isinstance(by_stage, dict) else []
    return {p for p in peers if isinstance(p, str)} if isinstance(peers, list) else set()


class RelayIterationEnd(RelayJoining):
    """end_iteration (average and step), advance (take the run's version without a lost step's update)."""

    async def rpc_end_iteration(self, msg: Message) -> Message:
        """Return once this replica has averaged with its stage and stepped (or the iteration timed out)."""
        assert self.replica is not None
        i = msg.iteration
        if i < self.replica.version:
            return await self._stepped()
        if i > self.replica.version:
            raise BadMessage(f"end of iteration {i} but this replica is at version {self.replica.version}")
        # A peer's role never changes: a view as old as a record's life tells it (no DHT read per step), and a
        # fresh read only for a sender not in that view (a data node that joined since)
        known = (await self.live_nodes(max_age=self.run.membership.record_ttl_s)).get(msg.sender)
        sender = known or (await self.live_nodes(max_age=0)).get(msg.sender)
        if sender is None or sender.role != "data":
            raise BadMessage("only a live data node ends an iteration")  # a relay cannot make a stage step early
        self.iteration_done.setdefault(i, set()).add(msg.sender)
        self.iteration_used.setdefault(i, set()).update(_peers_of(msg.meta.get("used"), self.stage))
        if "group" in msg.meta:
            self.iteration_group.setdefault(i, set()).update(_peers_of(msg.meta["group"], self.stage))
        if i not in self.iteration_steps:
            self.iteration_steps[i] = asyncio.ensure_future(self._finish_iteration(i))
        await asyncio.wait_for(
            asyncio.shield(self.iteration_steps[i]), timeout=self.run.iteration.iteration_timeout * 2
        )
        return await self._stepped()

    async def _stepped(self) -> Message:
        """The reply to a data node: this replica's version and the hash of its weights at it."""
        assert self.replica is not None
        digest = await self.compute(self.replica.weights_digest)
        return self.message("stepped", meta={"version": self.replica.version, "hash": digest})

    async def rpc_resync(self, msg: Message) -> Message:
        """A data node found this replica's weights off its stage's majority after a step: download the state from
        the majority's replicas (once, however many data nodes ask), then answer as `stepped` does."""
        assert self.replica is not None
        known = (await self.live_nodes(max_age=self.run.membership.record_ttl_s)).get(msg.sender)  # as above
        sender = known or (await self.live_nodes(max_age=0)).get(msg.sender)
        if sender is None or sender.role != "data":
            raise BadMessage("only a live data node asks a replica to resync")
        donors, want = msg.meta["donors"], msg.meta["hash"]
        if not isinstance(donors, list) or not isinstance(want, str):
            raise BadMessage("resync needs a list of donors and a hash")
        donors = sorted({p for p in donors if isinstance(p, str) and p != self.peer_id})
        if msg.iteration != self.replica.version or not donors:
            raise BadMessage(f"resync at v{msg.iteration} from {len(donors)} donors; this replica is at "
                             f"v{self.replica.version}")  # fmt: skip
        task = self.resyncs.get(msg.iteration)
        if task is None and await self.compute(self.replica.weights_digest) != want:
            task = self.resyncs[msg.iteration] = asyncio.ensure_future(self._resync(donors, want))
            self.resyncs = {v: t for v, t in self.resyncs.items() if v >= msg.iteration}
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), timeout=2 * self._state_wait_s())
        return await self._stepped()

    async def _resync(self, donors: list[str], want: str) -> None:
        assert self.replica is not None
        await self.download_state(donors, self._state_wait_s())
        got = await self.compute(self.replica.weights_digest)
        if got != want:
            log.warning("relay %s: stage %d resynced to %s, not the majority's %s (they stepped meanwhile?)",
                        self.peer_id[:8], self.stage, got[:8], want[:8])  # fmt: skip
        else:
            log.info("relay %s: stage %d resynced from %s", self.peer_id[:8], self.stage, donors[0][:8])
        await self.announce()

    def _state_wait_s(self) -> float:
        """A whole state download: the fixed wait plus parameters and both Adam moments at the floor bandwidth."""
        assert self.replica is not None
        nbytes = 3 * sum(p.numel() * 4 for p in self.replica.module.parameters())
        return self.run.iteration.iteration_timeout + transfer_s(nbytes, self.run.iteration.floor_bandwidth_mbps)

    async def rpc_advance(self, msg: Message) -> Message:
        """A data node found this stage one step behind the run with no replica left at the run's version (the
        replicas that stepped died before anyone downloaded from them): take the run's version without that step's
        update (one lost optimizer step for one stage, instead of a swarm stalled on a stage nobody can serve).
        A live replica at the run's version, if there is one after all, is downloaded from instead."""
        assert self.replica is not None
        i = msg.iteration
        nodes = await self.live_nodes(max_age=0)  # one fresh read serves both checks below
        sender = nodes.get(msg.sender)
        if sender is None or sender.role != "data" or sender.status != "serving":
            raise BadMessage("only a live data node advances a stage")
        pending = self.iteration_steps.get(i - 1)
        if self.replica.version != i - 1 or (pending is not None and not pending.done()):
            return self.message("advanced", meta={"version": self.replica.version})  # stepping still: not stale
        donors = [p for p, r in serving(nodes, "relay", self.stage).items()
                  if r.state_version >= i and p != self.peer_id]  # fmt: skip
        if donors and self.catching_up is None:
            self.catching_up = asyncio.ensure_future(self._catch_up(i))
            await asyncio.wait_for(asyncio.shield(self.catching_up), timeout=self.run.iteration.iteration_timeout)
        if self.replica.version == i - 1:
            log.warning("relay %s: stage %d advances to v%d without that step's update (no replica at v%d is left)",
                        self.peer_id[:8], self.stage, i, i)  # fmt: skip
            await self.compute(self.replica.skip_step, i)
            self.iteration_done.pop(i - 1, None)
            await self.announce()
        return self.message("advanced", meta={"version": self.replica.version})

    async def _finish_iteration(self, i: int) -> None:
        assert self.replica is not None
        deadline = time.monotonic() + self.run.iteration.iteration_timeout
        while time.monotonic() < deadline:  # wait for the data nodes to be done with i (messages, not the DHT)
            await self.fault("waiting", i)
            done = self.iteration_done.get(i, set())
            if len(done) >= self.spec.data_nodes:
                break
            # Fewer than expected so far: go on only once every data node the DHT still shows alive is done.
            if done and set(serving(await self.live_nodes(max_age=1.0), "data")) <= done:
                break
            await asyncio.sleep(0.02)
        await self._drain_tasks()
        group = await self._group(i)
        await self.fault("averaging", i)
        result = await self.averager.average(i, self.replica.grad_tensors(), self.replica.count, sorted(group))
        await self.fault("optimizer_step", i)
        await self.compute(self.replica.apply_averaged, result.grads, i)
        self.recovery.on_step(self, i + 1, result.grads)  # redundant: the update its shadows apply in turn
        self.sent_grads.clear()
        self.timings.clear()
        self.iteration_done.pop(i, None)
        self.iteration_steps = {k: v for k, v in self.iteration_steps.items() if k >= i}

    async def _group(self, i: int) -> set[str]:
        """The replicas of this stage that average at the end of iteration `i`: the ones the data nodes told to step
        (every replica gets the same lists, so the members agree on the group, and no DHT read is on the path of a
        step). From a data node that sends no list: the replicas at this version in a fresh view, and every live
        replica a data node routed through (those hold gradients that must not be left out)."""
        used = self.iteration_used.pop(i, set())
        told = self.iteration_group.pop(i, None)
        if told is not None:
            return told | {self.peer_id}  # the data nodes' lists hold the live replicas they routed through
        live = serving(await self.live_nodes(max_age=0), "relay", self.stage)
        return {p for p, r in live.items() if r.state_version == i} | (used & set(live))

    async def _drain_tasks(self) -> None:
        """Let in-flight backward work finish (bounded) before the gradients are read."""
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.run.transport.call_timeout)
