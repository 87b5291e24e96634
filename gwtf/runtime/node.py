"""The node base: what every relay and data node has. A node is an asyncio program over a `Transport` (in-process or
hivemind) and a `Membership` (in-memory or DHT), with its run's settings, its own options and its router.

Compute runs on one worker thread per node, so the event loop keeps answering calls and heartbeats while a stage
computes, and a node's gradient accumulation never races with itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from gwtf.device import resolve_device
from gwtf.faults import FaultInjector
from gwtf.lifecycle import COMPUTE_THREAD, name_os_thread
from gwtf.membership import Membership, NodeRecord, serving
from gwtf.routing.base import Router, SwarmView
from gwtf.routing.registry import make_router
from gwtf.runtime.spec import NodeOptions, RunSpec
from gwtf.sizing import transfer_s
from gwtf.transport import Message, Transport

log = logging.getLogger(__name__)


class NodeBase:
    """Transport, membership record and heartbeat, the compute thread, and bounded peer calls."""

    role = "node"

    def __init__(self, spec: RunSpec, transport: Transport, membership: Membership, opts: NodeOptions,
                 router: Router | None = None):  # fmt: skip
        self.spec, self.transport, self.membership, self.opts = spec, transport, membership, opts
        transport.use_wire(spec.config.wire)  # the run's codecs per kind of message (gwtf.transport.codecs)
        self.run = spec.config  # the run's settings, section by section (gwtf.config.RunConfig)
        self.device = resolve_device(opts.device)  # the first CUDA call, if any: the node's DHT is up already
        if self.device.type == "cuda":  # received tensors land in pinned buffers: host-to-device copies by DMA
            transport.pin_buffers()
        self.peer_id = transport.peer_id
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{self.peer_id[:6]}",
                                           initializer=name_os_thread, initargs=(COMPUTE_THREAD,))  # fmt: skip
        self.status = "joining"
        self.started = time.time()
        self.closed = False
        self._view: tuple[float, dict[str, NodeRecord]] | None = None
        # Peers a probe found gone, while their records live on (a SIGKILLed node's record outlives it by up to a TTL:
        # longer than a whole fast run), each with its record's expiry when first read after (wall clock; None before).
        self.gone: dict[str, float | None] = {}
        self.faults: FaultInjector | None = None
        self.run_version = 0
        self.maddrs: list[str] = []  # its DHT peer's addresses, in its record: a volunteer may join through them
        self.router = router or make_router(self.run.routing, spec.seed)  # started with the node, closed with it

    async def fault(self, phase: str, iteration: int) -> None:
        """A point where an injected fault may strike (gwtf.faults)."""
        if self.faults is not None:
            await self.faults.hit(self.peer_id, phase, iteration)

    # ---- helpers -----------------------------------------------------------------------------------------------
    async def compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def call(self, peer: str, name: str, msg: Message, timeout: float | None = None) -> Message:
        """A bounded call: `timeout` (default the run's call timeout) plus the message's bytes at the run's floor
        bandwidth (a 1.5b activation is 256 MiB: 14 s at 150 Mbit/s against a 10 s call timeout)."""
        if self.faults is not None:
            msg = await self.faults.on_send(self.peer_id, name, msg)
        floor = self.run.iteration.floor_bandwidth_mbps
        wait = (timeout or self.run.transport.call_timeout) + transfer_s(msg.nbytes, floor)
        return await self.transport.call(peer, name, msg, timeout=wait)

    def message(self, kind: str, **kw) -> Message:
        return Message(kind=kind, run_id=self.spec.run_id, **kw)

    def record(self) -> NodeRecord:
        raise NotImplementedError

    async def live_nodes(self, max_age: float | None = None) -> dict[str, NodeRecord]:
        """The live records, cached for `max_age` seconds (default: a heartbeat, as records change no faster):
        many waits poll it, and a DHT read costs every peer's DHT process CPU (it checks every record's signature).
        Peers found gone (`found_gone`) are left out until their record is renewed or expires. A read that fails
        (a DHT lookup timing out on a loaded machine) keeps the last view, said in one line, for a caller that takes
        a cached one; the next call reads again. A caller that asked for a fresh view (max_age=0) gets the error."""
        now = time.monotonic()
        if max_age is None:
            max_age = self.run.membership.heartbeat_s
        if self._view is None or now - self._view[0] > max_age:
            try:
                records = await asyncio.to_thread(self.membership.live_records)
            except (TimeoutError, OSError) as exc:
                if self._view is None or max_age <= 0:
                    raise
                log.warning("%s: reading the node records failed (%s); the view of %.0f s ago is kept",
                            self.peer_id[:8], type(exc).__name__, now - self._view[0])  # fmt: skip
                return self._view[1]
            self._view = (now, self._without_gone(records))
        return self._view[1]

    def found_gone(self, peers) -> None:
        """Peers a probe found certainly gone (gwtf.liveness): every view of the records leaves them out from now
        on, so routing, readiness and the stage-0 copy stop counting on them before their records expire."""
        new = [p for p in peers if p not in self.gone and p != self.peer_id]
        if not new:
            return
        for peer in new:
            self.gone[peer] = None
        self._view = None
        log.info("%s: %s found gone; left out of the records until they expire", self.peer_id[:8],
                 ", ".join(p[:8] for p in sorted(new)))  # fmt: skip

    def _without_gone(self, records: dict[str, tuple[NodeRecord, float]]) -> dict[str, NodeRecord]:
        """`records` less the peers found gone. A gone peer whose record is renewed (its expiry moved on by more
        than half a heartbeat: it beat again) is back; one whose record expired is forgotten (a full read only:
        one with this node's own record)."""
        now, renewed = time.time(), self.run.membership.heartbeat_s / 2
        nodes = {}
        for peer, (rec, left) in records.items():
            if peer in self.gone:
                expiry, first = now + left, self.gone[peer]
                if first is None or expiry <= first + renewed:
                    self.gone[peer] = expiry if first is None else first
                    continue
                del self.gone[peer]
                log.info("%s: %s was found gone but its record was renewed; counted again", self.peer_id[:8], peer[:8])
            nodes[peer] = rec
        if self.peer_id in records:
            for peer in [p for p in self.gone if p not in records]:
                del self.gone[peer]
        return nodes

    async def fresh_versions(self, nodes: dict[str, NodeRecord]) -> dict[str, NodeRecord]:
        """`nodes` with the state versions the serving data nodes know first hand where those are newer (records are
        written once a heartbeat and lag up to a step behind); best effort, each call bounded."""
        others = sorted(p for p in serving(nodes, "data") if p != self.peer_id)
        msg = self.message("versions")
        calls = [self.call(p, "versions", msg, timeout=self.run.transport.call_timeout) for p in others]
        nodes = dict(nodes)
        for peer, reply in zip(others, await asyncio.gather(*calls, return_exceptions=True)):
            versions = reply.meta.get("versions") if isinstance(reply, Message) else None
            if not isinstance(versions, dict):
                log.info("%s: no versions from data node %s (%s)", self.peer_id[:8], peer[:8], reply)
                continue
            for p, v in versions.items():
                if p in nodes and type(v) is int and v > nodes[p].state_version:
                    nodes[p] = dataclasses.replace(nodes[p], state_version=v)
        return nodes

    async def announce(self) -> None:
        """Write this node's record now; a failed write is logged, the heartbeat writes it again soon."""
        try:
            await asyncio.to_thread(self.membership.announce, self.record(), self.run.membership.record_ttl_s)
        except Exception as exc:  # the DHT refusing one store must not fail an iteration
            log.warning("%s: announcing its record failed (%s); the heartbeat retries", self.peer_id[:8], exc)

    def start_heartbeat(self) -> None:
        beat = self.run.membership
        self.membership.start_heartbeat(self.record, beat.heartbeat_s, beat.record_ttl_s)

    async def start_routing(self, stage: int, views: Callable[[dict[str, NodeRecord]], SwarmView], units: int = 0):
        """Start this node's router (a no-op for routers that only plan; gwtf-p2p: this node's own agent, in rounds
        until the node closes). `views(records)`: the swarm of every serving node; `units`: a data node's
        microbatches per iteration."""
        await self.router.start(self, stage, views, units)

    async def close(self) -> None:
        # Nothing is awaited before the record stops being refreshed: a relay that crashes closes from one of its
        # own tasks, which close() cancels, so the first await may be the last thing it runs.
        self.closed = True
        self.membership.close()
        await self.router.close()
        await self.transport.shutdown()
        self.executor.shutdown(wait=False, cancel_futures=True)
