"""A data node: holds stage 0 (embedding, final norm, LM head, loss) and a data shard, and drives iterations.

One iteration on a data node:
    1. route its microbatches (the router gives one path through a replica of every stage per microbatch; what the
       swarm cannot carry at once goes in a later wave);
    2. per microbatch (gwtf.runtime.flights): embed, send to stage 1, receive stage S's output, loss, send the
       gradient back, receive the embedding's gradient, routing around a dead hop on the way;
    3. average stage 0 with the other data nodes, step; tell every relay the iteration is done (they average within
       their stage and step) and wait for them;
    4. note the iteration in its telemetry (gwtf.telemetry), which a task publishes off the critical path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from typing import Any

import torch

from gwtf.averaging import GroupAverager
from gwtf.errors import BadMessage, PeerError
from gwtf.liveness import ProbeCache
from gwtf.lora import trainable_names
from gwtf.membership import Membership, NodeRecord, serving
from gwtf.resume import saved_stage
from gwtf.routing.base import Router, SwarmView
from gwtf.runtime import schema
from gwtf.runtime.consistency import Stage0Hashes, resync_diverged, weight_hashes
from gwtf.runtime.flights import Flight, FlightLegs, IterationReport
from gwtf.runtime.spec import NodeOptions, RunSpec
from gwtf.runtime.stage0_copy import newest_copy, push_copy
from gwtf.runtime.state import fetch_state
from gwtf.sizing import transfer_s
from gwtf.stage import StageReplica, state_bytes, state_subset
from gwtf.telemetry import TTL_S, Telemetry
from gwtf.transport import Message, Transport

log = logging.getLogger(__name__)
STALE_GRACE_S = 5.0  # a stage only one step behind for this long (no catch-up possible) is advanced
# Telemetry: a changed payload is published at most every PUBLISH_EVERY_S (a dashboard refreshes every few seconds;
# each publish is a signed DHT store that every peer holding the key checks: publishing every 0.5 s, the DHT threads
# and p2pd daemons of benchmarks.throughput's 4-stage debug swarm took 14-15 % of its CPU per step, 11-13 % at 2 s,
# and tokens/s rose 7 % (3 paired runs)); the peers that calls failed on are probed every PROBE_EVERY_S, off the
# critical path.
PUBLISH_EVERY_S = 2.0
PROBE_EVERY_S = 0.5
PUBLISH_TIMEOUT_S = 5.0  # one publish of the telemetry, and the probe of the peers whose calls failed


class DataNode(FlightLegs):
    role = "data"

    def __init__(
        self,
        spec: RunSpec,
        transport: Transport,
        membership: Membership,
        opts: NodeOptions,
        rank: int,
        schedule,
        build_module,
        view_builder,
        router: Router | None = None,
    ):
        super().__init__(spec, transport, membership, opts, router)
        self.rank, self.schedule = rank, schedule
        self.recovery = self.run.recovery.make()  # the microbatches' stage order (CheckFree+ swaps some)
        self.view_builder = view_builder  # (live records, iteration) -> SwarmView
        self.stage0 = StageReplica(0, build_module(0).to(self.device), spec.optim, spec.total_steps, capacity=1 << 30,
                                   precision=self.run.train.precision)  # fmt: skip
        self.head: Any = self.stage0.module  # models.staged.HeadStage: embed / loss
        self.iteration = 0
        self.expected_data_nodes = 1
        self.confirmed: dict[str, int] = {}  # relay -> version it replied `stepped` with (fresher than the DHT)
        self.flights: dict[int, Flight] = {}
        self.stale_since: dict[int, float] = {}  # stage -> when it was first seen with every replica a step behind
        self.advancing = asyncio.Lock()  # many waits check for stale stages; one at a time asks
        self.probes = ProbeCache(transport)  # late legs that share replicas share their probes
        self.averager = GroupAverager(transport, spec.run_id, "stage0", config=self.run.averaging,
                                      floor_mbps=self.run.iteration.floor_bandwidth_mbps)  # fmt: skip
        self.telemetry = Telemetry(self.peer_id)
        self.plan_view: SwarmView | None = None  # the view the iteration's first wave was planned on
        self.publisher: asyncio.Task | None = None
        self.stage0_hashes = Stage0Hashes(self)  # stage 0 checked identical across data nodes after every step
        self.copying: asyncio.Future | None = None  # stage 0's copy on its way (gwtf.runtime.stage0_copy)
        self.copies = {"sent": 0, "skipped": 0}  # copies pushed; steps whose copy was skipped (busy or resting)
        self.copy_due = 0.0  # monotonic time from which the next copy may go (iteration.stage0_copy_share)
        self.copied_version = -1  # the version of the last copy pushed
        for name, fn in {
            "head": self.rpc_head,
            "embed_grad": self.rpc_embed_grad,
            "route": self.rpc_route,
            "recover": self.rpc_recover,
            "fail": self.rpc_fail,
            "get_state": self.rpc_get_state,
            "relay_serving": self.rpc_relay_serving,
            "versions": self.rpc_versions,
            **self.stage0_hashes.handlers(),
        }.items():
            transport.add_handler(name, fn, validator=functools.partial(self.validate, handler=name))

    def record(self) -> NodeRecord:
        return NodeRecord(
            peer_id=self.peer_id,
            role="data",
            stage=0,
            status=self.status,
            capacity=0,
            compute_s=0.0,
            region=self.opts.region,
            state_version=self.stage0.version,
            holds_weights=True,
            grad_norm=self.stage0.last_grad_norm,
            throughput=0.0,
            microbatches_done=self.stage0.stats.backward,
            maddrs=list(self.maddrs),
            device=next(self.stage0.module.parameters()).device.type,
            held=len(self.flights),
        )

    async def start(self, expected_data_nodes: int = 1, timeout: float = 60.0) -> None:
        """Serve; at a run's start wait (bounded) for the run's other data nodes, so that no iteration runs
        without them; joining a run in progress, take stage 0 and the iteration from a live data node."""
        self.status = "serving"
        self.expected_data_nodes = expected_data_nodes
        await self.announce()
        self.start_heartbeat()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            peers = serving(await self.fresh_versions(await self.live_nodes(max_age=0)), "data")
            if any(r.state_version > 0 for r in peers.values()) or len(peers) >= expected_data_nodes:
                break
            await asyncio.sleep(0.1)
        ahead = sorted((r.state_version, p) for p, r in peers.items() if p != self.peer_id and r.state_version > 0)
        await self._take_stage0([p for _, p in reversed(ahead)], await self.live_nodes(max_age=0))
        units = len(self.schedule.microbatches(self.iteration, self.rank))  # gwtf-p2p: one per microbatch
        await self.start_routing(0, lambda records: self.view_builder(records, None), units)
        self.publisher = asyncio.ensure_future(self._publish_loop())

    async def _take_stage0(self, donors: list[str], nodes: dict[str, NodeRecord]) -> None:
        """Joining a run in progress: stage 0 and the step from the live data node furthest ahead (`donors`, best
        first), or, when none answers (the run lost every data node), the newest copy the replicas of stage 1 keep
        (gwtf.runtime.stage0_copy). At a run's start there is neither: stage 0 is the seed's."""
        for donor in donors:
            try:
                return await self._download_stage0(donor)
            except (PeerError, BadMessage) as exc:  # a crashed data node's record outlives it by its time to live
                log.warning("data node %s: stage 0 from %s failed (%s)", self.peer_id[:8], donor[:8], exc)
        relays = max((r.state_version for r in serving(nodes, "relay").values()), default=0)
        copy = await newest_copy(self, nodes) if relays > 0 else None
        source = "the relays' copy"
        if self.spec.config.resume:  # a resumed run (gwtf.resume): its saved stage 0, unless the run went past it
            saved = await asyncio.to_thread(saved_stage, self.spec.config.resume, 0, relays,
                                            "no data node is left to take stage 0 from")  # fmt: skip
            if saved is not None and (copy is None or copy[1]["version"] < saved[1]["version"]):
                copy, source = saved, "the run's saved state"
        if copy is None or copy[1]["version"] <= self.stage0.version:
            return
        await self.compute(self.stage0.load_state, *copy)
        behind = relays - self.stage0.version  # the copy is handed on in the background: it may lag the relays
        if behind > 0:
            await self.compute(self.stage0.skip_to, relays)
        self.iteration = self.stage0.version
        await self.announce()
        if source == "the relays' copy":
            log.warning("data node %s: no data node was left; stage 0 and step %d from the relays' copy%s",
                        self.peer_id[:8], self.iteration, f" of step {self.iteration - behind} (stage 0 takes the "
                        f"relays' step without the {behind} update(s) in between)" if behind > 0 else "")  # fmt: skip
        else:
            log.info("data node %s: the run resumes at step %d (stage 0 from its saved state)", self.peer_id[:8],
                     self.iteration)  # fmt: skip

    async def _download_stage0(self, donor: str) -> None:
        sizes = state_bytes(self.stage0.module)
        floor = self.run.iteration.floor_bandwidth_mbps
        wait = self.run.iteration.iteration_timeout + transfer_s(sum(sizes.values()), floor)

        async def get(peer: str, msg: Message) -> Message:
            return await self.call(peer, "get_state", msg, timeout=wait)

        # the trainable parameters; under LoRA stage 0 trains none and is taken whole (from the staged copy anyway)
        names = trainable_names(self.stage0.module) or [n for n, _ in self.stage0.module.named_parameters()]
        tensors, meta = await fetch_state(get, self.spec.run_id, [donor], names, sizes)
        await self.compute(self.stage0.load_state, tensors, meta)
        self.iteration = self.stage0.version
        await self.announce()
        log.info("data node %s joined at iteration %d (stage 0 from %s)", self.peer_id[:8], self.iteration, donor[:8])

    # ---- validation of what relays send back -------------------------------------------------------------------
    def validate(self, msg: Message, handler: str) -> None:
        """By the handler called: what relays send back must fit a microbatch in flight."""
        if handler not in schema.DATA:
            return
        schema.check_meta(schema.DATA, handler, msg)
        m = self.spec.model
        fl = self.flights.get(msg.microbatch_id)
        if fl is None or msg.iteration != self.iteration:
            raise BadMessage(f"no microbatch {msg.microbatch_id} in flight at iteration {msg.iteration}")
        schema.check_tensor_count(schema.DATA, handler, msg)
        expected = (*fl.x.shape, m.d_model)
        for t in msg.tensors:  # activations travel in the run's dtype (train.precision)
            if tuple(t.shape) != expected or t.dtype != self.stage0.wire:
                raise BadMessage(f"expected {self.stage0.wire} {expected}, got {t.dtype} {tuple(t.shape)}")

    async def rpc_relay_serving(self, msg: Message) -> Message:
        """A relay started serving: read the DHT now, not when the cached view expires, so that it is routed through
        and told to step from this iteration on (a replica left out of a step falls behind and must download)."""
        if msg.sender not in serving(await self.live_nodes(max_age=0), "relay"):
            raise BadMessage("only a serving relay announces itself")
        return self.message("ack")

    async def rpc_versions(self, msg: Message) -> Message:
        """The state versions this node knows first hand: its own, and each relay's from its `stepped` reply (DHT
        records are written once a heartbeat, so they can lag a step behind; a joiner asks here)."""
        return self.message("versions", meta={"versions": {**self.confirmed, self.peer_id: self.stage0.version}})

    async def rpc_get_state(self, msg: Message) -> Message:
        tensors, meta = await self.compute(self.stage0.state)
        part, meta = state_subset(tensors, meta, msg.meta.get("names"))
        return self.message("state", tensors=part, meta=meta)

    # ---- the view and readiness ----------------------------------------------------------------------------------
    async def current_nodes(self) -> dict[str, NodeRecord]:
        """Live records, with the versions relays confirmed in their replies where the DHT has not caught up."""
        return self._confirmed(await self.live_nodes())

    def _confirmed(self, live: dict[str, NodeRecord]) -> dict[str, NodeRecord]:
        nodes = dict(live)
        for p, version in self.confirmed.items():
            if p in nodes and nodes[p].state_version < version:
                nodes[p] = dataclasses.replace(nodes[p], state_version=version)
        return nodes

    async def view(self) -> SwarmView:
        return self.view_builder(await self.current_nodes(), self.iteration)

    async def wait_for_stages(self, timeout: float) -> None:
        """Until every relay stage has a serving replica at this iteration's version."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = await self.current_nodes()
            missing = [
                k
                for k in range(1, self.spec.model.n_stages + 1)
                if not any(r.state_version == self.iteration for r in serving(nodes, "relay", k).values())
            ]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise PeerError(f"stages {missing} have no serving replica at version {self.iteration}")
            await self._advance_stale(nodes)
            await asyncio.sleep(0.1)

    async def _advance_stale(self, nodes: dict[str, NodeRecord]) -> None:
        """A stage whose serving replicas are all one step behind this iteration, for STALE_GRACE_S (a replica at
        the version would have been downloaded from by then): the replicas that stepped died with the step's update.
        Have the ones behind take the version without it (RelayIterationEnd.rpc_advance) rather than wait for a
        stage nobody can serve until the run times out."""
        if self.advancing.locked():
            return
        async with self.advancing:
            await self._advance_stale_stages(nodes)

    async def _advance_stale_stages(self, nodes: dict[str, NodeRecord]) -> None:
        i, now = self.iteration, time.monotonic()
        for k in range(1, self.spec.model.n_stages + 1):
            replicas = serving(nodes, "relay", k)
            behind = sorted(p for p, r in replicas.items() if r.state_version == i - 1)
            if i == 0 or not behind or any(r.state_version == i for r in replicas.values()):
                self.stale_since.pop(k, None)
                continue
            if now - self.stale_since.setdefault(k, now) < STALE_GRACE_S:
                continue
            log.warning("stage %d: no replica at v%d is left; %d replica(s) at v%d advance without that step",
                        k, i, len(behind), i - 1)  # fmt: skip
            msg = self.message("advance", iteration=i)
            replies = await asyncio.gather(*(self.call(p, "advance", msg) for p in behind), return_exceptions=True)
            for p, reply in zip(behind, replies, strict=True):
                version = reply.meta.get("version") if isinstance(reply, Message) else None
                if type(version) is int and version > self.confirmed.get(p, -1):
                    self.confirmed[p] = version
            self.stale_since.pop(k, None)

    # ---- one iteration ---------------------------------------------------------------------------------------------
    async def run_iteration(self) -> IterationReport:
        i, t0 = self.iteration, time.perf_counter()
        await self.wait_for_stages(self.run.recovery.stage_timeout)
        pending = list(enumerate(self.schedule.microbatches(i, self.rank)))
        targets = self.schedule.microbatch_labels(i, self.rank)
        report = IterationReport(iteration=i, loss=float("nan"))
        while pending:
            flights = await self._plan_wave(pending)
            for fl in flights:  # the loss mask stays here: only the data node, the sink, computes the loss
                fl.labels = targets[fl.mb] if self.schedule.labels is not None else None
            report.waves += 1
            pending = pending[len(flights) :]
            await asyncio.gather(*(self._run_flight(fl, report) for fl in flights))
        report.check()
        report.loss = sum(report.losses) / max(len(report.losses), 1)
        report.weight_hashes, report.resynced = await self._finish_iteration(i)
        report.seconds = time.perf_counter() - t0
        await self._note_iteration(report)
        self.flights.clear()
        self.iteration += 1
        return report

    async def _plan_wave(self, pending: list[tuple[int, torch.Tensor]]) -> list[Flight]:
        first = not self.flights  # the iteration's first wave: its plan is the one the telemetry compares
        view = await self.view()
        data_nodes = sorted(view.data_nodes)
        demands = {d: len(pending) for d in data_nodes}
        deadline = time.monotonic() + self.run.recovery.stage_timeout
        while not (paths := self.router.plan(view, demands).get(self.peer_id, [])):
            if time.monotonic() > deadline:  # bounded: the swarm may be between a crash and a join
                raise PeerError(f"the router found no path through the swarm for {self.run.recovery.stage_timeout}s")
            await asyncio.sleep(0.2)
            await self._advance_stale(await self.current_nodes())
            view = await self.view()
        if first:
            self.plan_view = view
            self.telemetry.planned(self.iteration, paths, len(pending))
        flights = []
        for (mb, x), by_stage in zip(pending, paths):
            order = self.stage_order(mb)
            flights.append(Flight(mb, x, [by_stage[k - 1] for k in order], order, self.peer_id))
        for fl in flights:
            self.flights[fl.mb] = fl
        return flights

    # ---- iteration end -----------------------------------------------------------------------------------------------
    async def _data_peers(self, timeout: float = 5.0) -> dict[str, NodeRecord]:
        """A fresh view that shows the run's expected data nodes if they are alive (bounded wait): averaging stage 0
        with fewer than all of them, each leading its own round, would let their copies of stage 0 diverge."""
        deadline = time.monotonic() + timeout
        nodes = await self.live_nodes()
        while len(serving(nodes, "data")) < self.expected_data_nodes and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            nodes = await self.live_nodes(max_age=0)
        return nodes

    async def _finish_iteration(self, i: int) -> tuple[dict[int, tuple[int, int]], int]:
        """Average and step stage 0, have the relays step, check their weights agree. Returns ({stage: (replicas that
        reported a weight hash, distinct hashes)}, replicas resynchronised)."""
        nodes = await self._data_peers()
        peers = sorted(serving(nodes, "data"))  # all of them: a record's version may lag behind a slow DHT
        result = await self.averager.average(i, self.stage0.grad_tensors(), self.stage0.count, peers)
        await self.compute(self.stage0.apply_averaged, result.grads, i)
        if self._copy_busy():
            self.copies["skipped"] += 1  # the last copy is still on its way, or resting
            log.debug("%s: stage 0's copy of v%d skipped (the last one is on its way or resting)", self.peer_id[:8], i)
        else:  # its state copied (CPU, 340 MB for SmolLM2) only when it is handed on
            self._hand_on_copy(await self.compute(self.stage0.state), self._confirmed(nodes))
        live = serving(self._confirmed(nodes), "relay")
        used: dict[str, set[str]] = {}
        for fl in self.flights.values():
            for stage, peer in zip(fl.order, fl.route):
                used.setdefault(str(stage), set()).add(peer)
        # Each stage's group: its replicas at this version and the live ones this node routed through. The replicas
        # average with exactly these (with the other data nodes' lists), so they agree on it without a DHT read.
        group = {str(k): {p for p, r in live.items() if r.stage == k and r.state_version == i}
                 for k in range(1, self.spec.model.n_stages + 1)}  # fmt: skip
        for k, routed in used.items():
            group.setdefault(k, set()).update(p for p in routed if p in live)
        relays = sorted(set().union(*group.values()))
        meta = {"used": {k: sorted(v) for k, v in used.items()}, "group": {k: sorted(v) for k, v in group.items()}}
        done = self.message("end_iteration", iteration=i, meta=meta)
        stage0 = asyncio.ensure_future(self.stage0_hashes.check(i, peers))  # while the relays step
        replies = await asyncio.gather(
            *(self.call(p, "end_iteration", done, timeout=3 * self.run.iteration.iteration_timeout) for p in relays),
            return_exceptions=True,
        )
        for p, r in zip(relays, replies):
            if isinstance(r, BaseException):
                log.warning("iteration %d: relay %s did not step (%s)", i, p[:8], r)
            else:
                self.confirmed[p] = int(r.meta["version"])
        stepped = {p: r for p, r in zip(relays, replies) if isinstance(r, Message)}
        stages = {p: live[p].stage for p in stepped if p in live}
        (stage0_counts, stage0_resynced), hashes = await stage0, weight_hashes(i, stepped, stages)
        hashes = {0: stage0_counts, **hashes} if stage0_counts else hashes
        return hashes, stage0_resynced + len(await self._resync_diverged(i, stepped, stages))

    def _hand_on_copy(self, state: tuple[dict[str, torch.Tensor], dict], nodes: dict[str, NodeRecord]) -> None:
        """Stage 0's state (CPU copies) to the keepers in the background, off the step's critical path: at real sizes
        the copy is the step's largest transfer (a 124m stage 0 with its Adam moments is 563 MB per keeper). While
        the last copy is still on its way, and for (1 / share - 1) times the time it took after it arrived
        (iteration.stage0_copy_share), a step's copy is skipped (`_finish_iteration`), so the copies take at most
        that share of the data node's links whatever their bandwidth; a new data node that takes an older copy takes
        the relays' step without the updates in between (`_take_stage0`)."""
        self.copies["sent"] += 1
        self.copied_version = state[1]["version"]
        self.copying = asyncio.ensure_future(self._push_and_rest(state, nodes))

    def _copy_busy(self) -> bool:
        """Is the last copy still on its way, or resting (`_push_and_rest`)?"""
        return (self.copying is not None and not self.copying.done()) or time.monotonic() < self.copy_due

    async def _push_and_rest(self, state: tuple[dict[str, torch.Tensor], dict], nodes: dict[str, NodeRecord]) -> int:
        """Push a copy; then it rests (1 / share - 1) times as long as it took, so copies take at most
        `iteration.stage0_copy_share` of the wall time (a copy that failed rests too: its peers were busy or gone)."""
        started = time.monotonic()
        try:
            return await push_copy(self, *state, nodes)
        finally:
            now = time.monotonic()
            self.copy_due = now + (1 / self.run.iteration.stage0_copy_share - 1) * (now - started)

    async def hand_on_last_copy(self) -> int:
        """At the run's last step: the copy on its way finished, then the final version's copy pushed and awaited (if
        the one on its way was older), so the keepers hold the run's final stage 0 (a stopped run resumes from its
        nodes at its last step) and nothing is still streaming into the edge relays when the run is reported done
        (an export that reads them then would compete with the copy: at SmolLM2 size, 340 MB per keeper). Each part
        is a bounded call (push_copy). Returns the version the keepers were handed."""
        await self._copy_arrived()
        if self.copied_version != self.stage0.version:
            self._hand_on_copy(await self.compute(self.stage0.state), self._confirmed(await self.live_nodes()))
            await self._copy_arrived()
        return self.copied_version

    async def _copy_arrived(self) -> None:
        if self.copying is not None:
            await asyncio.gather(self.copying, return_exceptions=True)  # push_copy logs a keeper that failed

    async def _resync_diverged(self, i: int, stepped: dict[str, Message], stages: dict[str, int]) -> dict[str, str]:
        """Replicas whose weights differ from their stage's majority download it before the next iteration."""

        async def resync(peer: str, msg: Message) -> Message:
            return await self.call(peer, "resync", msg, timeout=3 * self.run.iteration.iteration_timeout)

        return await resync_diverged(resync, self.spec.run_id, i, stepped, stages)

    # ---- telemetry -----------------------------------------------------------------------------------------------
    async def call(self, peer: str, name: str, msg: Message, timeout: float | None = None) -> Message:
        try:
            return await super().call(peer, name, msg, timeout)
        except PeerError:
            self.telemetry.suspect(peer)  # probed off the critical path: a peer found gone is reported
            raise

    async def _note_iteration(self, report: IterationReport) -> None:
        """What the iteration did, for the telemetry: its routes, the flights' re-routes, rebuilds the relays' records
        show and the versions the relays confirmed. Cheap (no call, a cached DHT read)."""
        flights = list(self.flights.values())
        routes = [fl.route for fl in flights if fl.outcome != "lost"]
        self.telemetry.iteration(report, routes, self.plan_view or await self.view())
        restarts, recoveries = sum(fl.attempt for fl in flights), sum(fl.recomputed for fl in flights)
        reroutes = sum(fl.reroutes for fl in flights) - restarts - recoveries
        self.telemetry.flight_events(report.iteration, restarts, reroutes, recoveries)
        relays = serving(await self.live_nodes(), "relay")
        self.telemetry.rebuilds(relays)
        self.telemetry.set_versions(self.stage0.version, {p: v for p, v in self.confirmed.items() if p in relays})

    async def _publish_loop(self) -> None:
        published, published_at = -1, 0.0
        while not self.closed:
            await asyncio.sleep(PROBE_EVERY_S)
            try:
                await self._probe_suspects()
            except Exception as exc:  # a failed DHT read: the publisher must outlive it (the suspects stay)
                log.warning("%s: probing suspects failed (%s: %s)", self.peer_id[:8], type(exc).__name__, exc)
            if self.telemetry.version != published and time.monotonic() - published_at >= PUBLISH_EVERY_S:
                published, published_at = self.telemetry.version, time.monotonic()
                await self.publish_telemetry()

    async def _probe_suspects(self) -> None:
        """The peers a call failed on, probed: those certainly gone are reported (their records outlive them)."""
        suspects = set(self.telemetry.suspects)
        if not suspects:
            return
        stages = {p: r.stage for p, r in (await self.live_nodes()).items()}
        gone = await self.probes.gone(suspects, timeout=PUBLISH_TIMEOUT_S)
        self.telemetry.suspects -= suspects
        self.telemetry.found_gone(sorted(gone), stages)
        self.found_gone(gone)

    async def publish_telemetry(self) -> None:
        """Publish the telemetry now. Best effort: a failed publish is logged, and the next one carries the same
        windows of history and events."""
        payload = self.telemetry.payload(self.transport.wire)
        publish = asyncio.to_thread(self.membership.publish_telemetry, payload, TTL_S)
        try:
            await asyncio.wait_for(publish, PUBLISH_TIMEOUT_S)
        except Exception as exc:  # the DHT refusing one store must never stop training
            log.warning("%s: publishing telemetry failed (%s: %s)", self.peer_id[:8], type(exc).__name__, exc)

    async def close(self) -> None:
        """Stop publishing; a data node that stops (not a crash) says so in a last publish (bounded), and in its
        record ("leaving"), so the relays see at once that the run is over (gwtf.membership.RunEnd)."""
        if self.copying is not None:
            self.copying.cancel()
        if self.publisher is not None and not self.closed:
            self.publisher.cancel()
            self.telemetry.finished = True
            await self.publish_telemetry()
            self.status = "leaving"
            await self.announce()
        await super().close()
