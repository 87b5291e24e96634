"""A data node: holds stage 0 (embedding, final norm, LM head, loss) and a data shard, and drives iterations.

One iteration on a data node:
    1. route its microbatches (the router gives one path through a replica of every stage per microbatch; what the
       swarm cannot carry at once goes in a later wave);
    2. per microbatch: embed, send to stage 1, receive stage S's output, loss, send the gradient back, receive the
       embedding's gradient; a dead hop on the way is routed around (forward: resend to another replica; backward:
       the upstream of the dead replica resends its activation to a new one, which recomputes that one stage);
    3. average stage 0 with the other data nodes, step; tell every relay the iteration is done (they average within
       their stage and step) and wait for them.
Every microbatch started is accounted: finished, finished after a re-route, partial (its backward stopped at a dead
replica; the stages it reached keep its gradient), or lost (no path through the swarm within `max_attempts`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gwtf.averaging import GroupAverager
from gwtf.errors import BadMessage, PeerError
from gwtf.liveness import ProbeCache
from gwtf.membership import Membership, NodeRecord
from gwtf.node import NodeBase, RunSpec, SwarmConfig, fetch_state, serving
from gwtf.routing.base import Router, SwarmView
from gwtf.routing.p2p import P2PRouter
from gwtf.stage import StageReplica, state_subset
from gwtf.transport import Message, Transport

log = logging.getLogger(__name__)
STALE_GRACE_S = 5.0  # a stage only one step behind for this long (no catch-up possible) is advanced
RECOVERY_GRACE_S = 5.0  # after a failed recovery, how long a leg may still come back before it is given up
PROBE_ROUTE_AFTER_S = 1.0  # a leg out longer than this has its route's replicas probed (then once a second)


class _Restart(Exception):
    """A hop of this microbatch's route died before its forward came back: start it again elsewhere."""


@dataclass
class Flight:
    """One microbatch in flight."""

    mb: int
    x: torch.Tensor  # (batch, seq) token ids
    route: list[str]  # one replica per stage, in visit order
    order: list[int]  # the stage at each position (1..S, or CheckFree+'s swapped order)
    origin: str
    attempt: int = 0
    h0: torch.Tensor | None = None  # embedding output, with its graph, until the embedding's gradient comes back
    head: asyncio.Future | None = None
    grad: asyncio.Future | None = None
    loss: float | None = None
    reroutes: int = 0
    outcome: str = "started"
    avoid: set[str] = field(default_factory=set)  # replicas that failed this microbatch: not offered again
    give_up_at: float = float("inf")  # monotonic time after which its current leg is abandoned (a failed recovery)

    def meta(self) -> dict:
        return {"route": list(self.route), "order": self.order, "origin": self.origin, "attempt": self.attempt}

    def by_stage(self) -> list[str]:
        """The route as the router sees it: the replica of stage 1, 2, ..., S."""
        return [self.route[self.order.index(k)] for k in range(1, len(self.order) + 1)]


@dataclass
class IterationReport:
    iteration: int
    loss: float
    started: int = 0
    finished: int = 0
    rerouted: int = 0  # microbatches that finished after at least one re-route or restart
    partial: int = 0
    lost: int = 0
    waves: int = 0
    seconds: float = 0.0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)

    def check(self) -> None:
        if self.started != self.finished + self.partial + self.lost:
            raise AssertionError(f"iteration {self.iteration}: accounting broken {asdict(self)}")


class DataNode(NodeBase):
    role = "data"

    def __init__(
        self,
        spec: RunSpec,
        transport: Transport,
        membership: Membership,
        cfg: SwarmConfig,
        rank: int,
        schedule,
        router: Router,
        build_module,
        view_builder,
    ):
        super().__init__(spec, transport, membership, cfg)
        self.rank, self.schedule, self.router = rank, schedule, router
        self.view_builder = view_builder  # (live records, iteration) -> SwarmView
        self.stage0 = StageReplica(0, build_module(0), spec.optim, spec.total_steps, capacity=1 << 30)
        self.head: Any = self.stage0.module  # models.staged.HeadStage: embed / loss
        self.iteration = 0
        self.expected_data_nodes = 1
        self.confirmed: dict[str, int] = {}  # relay -> version it replied `stepped` with (fresher than the DHT)
        self.flights: dict[int, Flight] = {}
        self.stale_since: dict[int, float] = {}  # stage -> when it was first seen with every replica a step behind
        self.advancing = asyncio.Lock()  # many waits check for stale stages; one at a time asks
        self.probes = ProbeCache(transport)  # late legs that share replicas share their probes
        self.averager = GroupAverager(transport, spec.run_id, "stage0", timeout=cfg.average_timeout)
        for name, fn in {
            "head": self.rpc_head,
            "embed_grad": self.rpc_embed_grad,
            "route": self.rpc_route,
            "recover": self.rpc_recover,
            "fail": self.rpc_fail,
            "get_state": self.rpc_get_state,
            "relay_serving": self.rpc_relay_serving,
            "versions": self.rpc_versions,
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
            region=self.cfg.region,
            state_version=self.stage0.version,
            holds_weights=True,
            grad_norm=self.stage0.last_grad_norm,
            throughput=0.0,
            microbatches_done=self.stage0.stats.backward,
            maddrs=[],
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
        if ahead:
            await self._download_stage0(ahead[-1][1])
        if isinstance(self.router, P2PRouter):  # its own agent, one unit per microbatch of an iteration
            units = len(self.schedule.microbatches(self.iteration, self.rank))
            self.router.attach(await self.start_routing(0, lambda records: self.view_builder(records, None), units))

    async def _download_stage0(self, donor: str) -> None:
        async def get(peer: str, msg: Message) -> Message:
            return await self.call(peer, "get_state", msg, timeout=self.cfg.iteration_timeout)

        names = [n for n, _ in self.stage0.module.named_parameters()]
        tensors, meta = await fetch_state(get, self.spec.run_id, [donor], names)
        await self.compute(self.stage0.load_state, tensors, meta)
        self.iteration = self.stage0.version
        await self.announce()
        log.info("data node %s joined at iteration %d (stage 0 from %s)", self.peer_id[:8], self.iteration, donor[:8])

    # ---- validation of what relays send back -------------------------------------------------------------------
    def validate(self, msg: Message, handler: str) -> None:
        """By the handler called: what relays send back must fit a microbatch in flight."""
        if handler not in ("head", "embed_grad", "recover", "route", "fail"):
            return
        needed = {"head": ("route", "attempt"), "embed_grad": ("route", "attempt"), "route": ("position", "dead"),
                  "recover": ("route", "attempt", "dead_pos", "dead"), "fail": ("attempt",)}[handler]  # fmt: skip
        missing = [f for f in needed if f not in msg.meta]
        if missing:
            raise BadMessage(f"{handler} needs meta field(s) {', '.join(missing)}")
        m = self.spec.model
        fl = self.flights.get(msg.microbatch_id)
        if fl is None or msg.iteration != self.iteration:
            raise BadMessage(f"no microbatch {msg.microbatch_id} in flight at iteration {msg.iteration}")
        n_expected = 0 if handler in ("route", "fail") else 1
        if len(msg.tensors) != n_expected:
            raise BadMessage(f"{handler} carries {n_expected} tensor(s), got {len(msg.tensors)}")
        expected = (*fl.x.shape, m.d_model)
        for t in msg.tensors:
            if tuple(t.shape) != expected or t.dtype != torch.float32:
                raise BadMessage(f"expected float32 {expected}, got {t.dtype} {tuple(t.shape)}")

    def _current(self, msg: Message) -> Flight | None:
        fl = self.flights.get(msg.microbatch_id)
        if fl is None or int(msg.meta.get("attempt", -1)) != fl.attempt:
            return None  # a stale attempt's late answer: acknowledged and ignored
        return fl

    async def rpc_head(self, msg: Message) -> Message:
        fl = self._current(msg)
        if fl is not None and fl.head is not None and not fl.head.done():
            fl.head.set_result(msg.tensors[0])
        return self.message("ack")

    async def rpc_embed_grad(self, msg: Message) -> Message:
        fl = self._current(msg)
        if fl is not None and fl.grad is not None and not fl.grad.done():
            fl.route = list(msg.meta["route"])
            fl.grad.set_result(msg.tensors[0])
        return self.message("ack")

    async def rpc_route(self, msg: Message) -> Message:
        """A relay's next hop died: give it (and remember) a new replica of that stage."""
        fl = self._current(msg)
        if fl is None:
            raise BadMessage(f"microbatch {msg.microbatch_id} is not in flight")
        dead, pos = str(msg.meta["dead"]), int(msg.meta["position"])
        fl.avoid.add(dead)  # a full replica too: this hop has tried it already
        others = {r.peer_id for r in (await self.view()).replicas(fl.order[pos])} - fl.avoid
        new = await self._replace(fl, pos, set(fl.avoid) if others else {dead})
        return self.message("route", meta={"route": fl.route, "replica": new})

    async def rpc_fail(self, msg: Message) -> Message:
        """A relay of the route gave up forwarding this microbatch (no live next hop within its attempts): restart
        the microbatch now instead of waiting for the leg until the microbatch timeout."""
        fl = self._current(msg)
        if fl is not None and msg.sender in fl.route and fl.head is not None and not fl.head.done():
            fl.head.set_exception(_Restart(f"relay {msg.sender[:8]} found no live next hop"))
        return self.message("ack")

    async def _replace(self, fl: Flight, pos: int, dead: set[str]) -> str:
        """A live replica for position `pos` of this microbatch's route; when its stage has none left (every replica
        lost), wait, bounded, for it to be rebuilt (gwtf.recovery) by a joiner."""
        stage = fl.order[pos]
        deadline = time.monotonic() + self.cfg.stage_recovery_timeout
        while (new := self.router.reroute(await self.view(), fl.by_stage(), stage, dead)) is None:
            if time.monotonic() > deadline:
                raise BadMessage(f"no live replica of stage {stage} for {self.cfg.stage_recovery_timeout:.0f}s")
            await asyncio.sleep(0.2)
            await self._advance_stale(await self.current_nodes())
        fl.route[pos] = new
        fl.reroutes += 1
        return new

    async def rpc_recover(self, msg: Message) -> Message:
        """The replica at position `dead_pos` died after its forward: have its upstream resend to a new replica,
        which recomputes that one stage."""
        fl = self._current(msg)
        if fl is None:
            raise BadMessage(f"microbatch {msg.microbatch_id} is not in flight")
        k = int(msg.meta["dead_pos"])
        fl.route = list(msg.meta["route"])
        new = await self._replace(fl, k, {str(msg.meta["dead"])})
        meta = fl.meta()
        if k == 0:
            if fl.h0 is None:  # a late recovery request: the embedding's backward already ran
                raise BadMessage(f"microbatch {fl.mb} has finished its backward")
            req = self.message(
                "recompute",
                iteration=self.iteration,
                microbatch_id=fl.mb,
                stage=0,
                tensors=[fl.h0.detach(), msg.tensors[0]],
                meta=meta,
            )
            await self.call(new, "recompute", req)
        else:
            req = self.message(
                "resend", iteration=self.iteration, microbatch_id=fl.mb, stage=0, tensors=[msg.tensors[0]], meta=meta
            )
            await self.call(fl.route[k - 1], "resend", req)
        log.info("mb %d: stage %d recomputed on %s", fl.mb, fl.order[k], new[:8])
        return self.message("ack")

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
        Have the ones behind take the version without it (gwtf.node.RelayNode.rpc_advance) rather than wait for a
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
        await self.wait_for_stages(self.cfg.stage_recovery_timeout)
        pending = list(enumerate(self.schedule.microbatches(i, self.rank)))
        report = IterationReport(iteration=i, loss=float("nan"))
        while pending:
            flights = await self._plan_wave(pending)
            report.waves += 1
            pending = pending[len(flights) :]
            await asyncio.gather(*(self._run_flight(fl, report) for fl in flights))
        report.check()
        report.loss = sum(report.losses) / max(len(report.losses), 1)
        await self._finish_iteration(i)
        report.seconds = time.perf_counter() - t0
        self.flights.clear()
        self.iteration += 1
        return report

    async def _plan_wave(self, pending: list[tuple[int, torch.Tensor]]) -> list[Flight]:
        view = await self.view()
        data_nodes = sorted(view.data_nodes)
        demands = {d: len(pending) for d in data_nodes}
        deadline = time.monotonic() + self.cfg.stage_recovery_timeout
        while not (paths := self.router.plan(view, demands).get(self.peer_id, [])):
            if time.monotonic() > deadline:  # bounded: the swarm may be between a crash and a join
                raise PeerError(f"the router found no path through the swarm for {self.cfg.stage_recovery_timeout}s")
            await asyncio.sleep(0.2)
            await self._advance_stale(await self.current_nodes())
            view = await self.view()
        flights = []
        for (mb, x), by_stage in zip(pending, paths):
            order = self.stage_order(mb)
            flights.append(Flight(mb, x, [by_stage[k - 1] for k in order], order, self.peer_id))
        for fl in flights:
            self.flights[fl.mb] = fl
        return flights

    async def _run_flight(self, fl: Flight, report: IterationReport) -> None:
        report.started += 1
        report.tokens += fl.x.numel()
        hidden = await self._forward_leg(fl)
        if hidden is None:
            fl.outcome = "lost"
            report.lost += 1
            log.error("mb %d lost: no route through the swarm in %d attempts", fl.mb, self.cfg.max_attempts)
            return
        loss, grad = await self.compute(self._head_backward, hidden, fl.x)
        fl.loss = loss
        report.losses.append(loss)
        if await self._backward_leg(fl, grad):
            fl.outcome = "finished"
            report.finished += 1
            report.rerouted += int(fl.reroutes > 0)
        else:
            fl.outcome = "partial"
            report.partial += 1

    async def _forward_leg(self, fl: Flight) -> torch.Tensor | None:
        for attempt in range(self.cfg.max_attempts):
            fl.attempt = attempt
            loop = asyncio.get_running_loop()
            fl.head, fl.grad = loop.create_future(), loop.create_future()
            fl.give_up_at = float("inf")
            if attempt:
                fl.reroutes += 1
                await self._release(fl, attempt - 1)
                await self._fresh_route(fl)
            fl.h0 = await self.compute(self._embed, fl.x)
            try:
                await self._send_first(fl)
                return await self._await(fl, fl.head, on_dead=self._restart)
            except (PeerError, _Restart) as exc:
                log.info("mb %d attempt %d: %s; restarting", fl.mb, attempt, exc)
        return None

    def stage_order(self, mb: int) -> list[int]:
        """The order a microbatch visits the relay stages: 1..S, except under CheckFree+, which swaps stages 1,2 and
        S-1,S on half of the microbatches so each edge stage's partner learns to stand in for it."""
        n = self.spec.model.n_stages
        if self.cfg.recovery == "checkfree+":
            from gwtf.recovery import swap_order

            return list(swap_order(n, mb))
        return list(range(1, n + 1))

    async def _release(self, fl: Flight, attempt: int) -> None:
        """Best effort: the replicas of the old route drop what they hold of the abandoned attempt."""
        meta = {"origin": self.peer_id, "attempt": attempt}
        msg = self.message("release", iteration=self.iteration, microbatch_id=fl.mb, meta=meta)
        calls = [self.call(p, "release", msg, timeout=1.0) for p in set(fl.route)]
        await asyncio.gather(*calls, return_exceptions=True)

    async def _fresh_route(self, fl: Flight) -> None:
        live = set(await self.live_nodes())
        for pos, peer in enumerate(list(fl.route)):
            if peer not in live:
                await self._replace(fl, pos, {peer})

    async def _send_first(self, fl: Flight) -> None:
        assert fl.h0 is not None
        deadline, pause, failures = time.monotonic() + self.cfg.microbatch_timeout, 0.02, 0
        while failures < self.cfg.max_attempts and time.monotonic() < deadline:
            msg = self.message(
                "forward",
                iteration=self.iteration,
                microbatch_id=fl.mb,
                stage=0,
                tensors=[fl.h0.detach()],
                meta=fl.meta(),
            )
            try:
                await self.call(fl.route[0], "forward", msg)
                return
            except PeerError as exc:
                if "full" in str(exc):  # busy, not broken: wait for capacity (backing off, bounded)
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, 0.5)
                    continue
                failures += 1
                await self._replace(fl, 0, {fl.route[0]})
        raise PeerError(f"the first stage refused microbatch {fl.mb}")

    async def _await(self, fl: Flight, fut: asyncio.Future, on_dead) -> torch.Tensor:
        """Wait for a leg to come back, calling `on_dead(position, peer)` when a hop of the route has died."""
        deadline = time.monotonic() + self.cfg.microbatch_timeout
        next_probe = time.monotonic() + PROBE_ROUTE_AFTER_S
        while time.monotonic() < min(deadline, fl.give_up_at):
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout=0.25)
            except TimeoutError:
                live = await self.live_nodes()
                gone_now: set[str] = set()
                if time.monotonic() >= next_probe:  # a crashed hop's DHT record outlives it by up to its TTL: ask
                    gone_now = await self.probes.gone(set(fl.route), timeout=PROBE_ROUTE_AFTER_S)
                    next_probe = time.monotonic() + PROBE_ROUTE_AFTER_S
                dead = [(pos, p) for pos, p in enumerate(fl.route) if p not in live or p in gone_now]
                if dead:
                    await on_dead(*dead[-1])
        if time.monotonic() >= fl.give_up_at:
            raise _Restart(f"no answer within {RECOVERY_GRACE_S:.0f}s of a failed recovery")
        raise _Restart(f"no answer within {self.cfg.microbatch_timeout:.0f}s")

    async def _restart(self, pos: int, peer: str) -> None:
        raise _Restart(f"replica {peer[:8]} at position {pos} of the route died")

    async def _backward_leg(self, fl: Flight, grad: torch.Tensor) -> bool:
        """Send the loss gradient back along the route; a replica that dies on the way is recomputed elsewhere."""
        last = len(fl.route) - 1
        recovered: set[str] = set()

        async def recover_dead(pos: int, peer: str) -> None:
            """The replica at `pos` died after its forward: the next hop (or this node, for the last position)
            resends the gradient it sent it, and the upstream its activation, to a new replica that recomputes."""
            if peer in recovered:
                return
            recovered.add(peer)
            try:
                if pos == last:
                    meta = {**fl.meta(), "dead_pos": pos, "dead": peer}
                    req = self.message("recover", iteration=self.iteration, microbatch_id=fl.mb, tensors=[grad],
                                       meta=meta)  # fmt: skip
                    await self.rpc_recover(req)
                else:
                    req = self.message("regrad", iteration=self.iteration, microbatch_id=fl.mb, meta=fl.meta())
                    await self.call(fl.route[pos + 1], "regrad", req)
            except (PeerError, BadMessage) as exc:
                log.warning("mb %d: recovery of stage %d failed: %s", fl.mb, fl.order[pos], exc)
                # The gradient may still come (the dead replica had passed it on already); if not, nothing will
                # bring it: wait a grace period, not the whole microbatch timeout.
                fl.give_up_at = min(fl.give_up_at, time.monotonic() + RECOVERY_GRACE_S)

        msg = self.message("backward", iteration=self.iteration, microbatch_id=fl.mb, stage=0, tensors=[grad],
                           meta=fl.meta())  # fmt: skip
        try:
            await self.call(fl.route[last], "backward", msg)
        except PeerError as exc:
            log.info("mb %d: last hop %s failed on backward (%s)", fl.mb, fl.route[last][:8], exc)
            await recover_dead(last, fl.route[last])
        try:
            assert fl.grad is not None
            g0 = await self._await(fl, fl.grad, on_dead=recover_dead)
        except _Restart as exc:
            log.warning("mb %d: backward incomplete (%s)", fl.mb, exc)
            return False
        await self.compute(self._embed_backward, fl, g0)
        return True

    # ---- stage-0 compute (on the node's compute thread) --------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.embed(x)

    def _head_backward(self, hidden: torch.Tensor, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        h = hidden.detach().requires_grad_(True)
        loss = self.head.loss(h, x)
        loss.backward()
        self.stage0.count += 1
        self.stage0.stats.backward += 1
        assert h.grad is not None
        return float(loss.detach()), h.grad.detach()

    def _embed_backward(self, fl: Flight, g0: torch.Tensor) -> None:
        assert fl.h0 is not None
        fl.h0.backward(g0)
        fl.h0 = None

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

    async def _finish_iteration(self, i: int) -> None:
        nodes = await self._data_peers()
        peers = sorted(serving(nodes, "data"))  # all of them: a record's version may lag behind a slow DHT
        result = await self.averager.average(i, self.stage0.grad_tensors(), self.stage0.count, peers)
        await self.compute(self.stage0.apply_averaged, result.grads, i)
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
        replies = await asyncio.gather(
            *(self.call(p, "end_iteration", done, timeout=3 * self.cfg.iteration_timeout) for p in relays),
            return_exceptions=True,
        )
        for p, r in zip(relays, replies):
            if isinstance(r, BaseException):
                log.warning("iteration %d: relay %s did not step (%s)", i, p[:8], r)
            else:
                self.confirmed[p] = int(r.meta["version"])
        # this node's new version reaches the DHT with its next heartbeat (see RelayNode._finish_iteration)
