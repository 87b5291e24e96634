"""A data node's microbatches in flight: `Flight` (one microbatch on its route), `IterationReport` (every microbatch
started is accounted: finished, finished after a re-route, partial (its backward stopped at a dead replica; the
stages it reached keep its gradient), or lost (no path through the swarm within `max_attempts`)), and the legs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from gwtf.device import autocast, to_device, to_host
from gwtf.errors import BadMessage, PeerError
from gwtf.liveness import ProbeCache
from gwtf.membership import NodeRecord
from gwtf.recovery import RecoveryStrategy
from gwtf.routing.base import SwarmView
from gwtf.runtime import schema
from gwtf.runtime.node import NodeBase
from gwtf.sizing import transfer_s
from gwtf.stage import StageReplica
from gwtf.telemetry import Telemetry
from gwtf.transport import Message

log = logging.getLogger(__name__)
RECOVERY_GRACE_S = 5.0  # after a failed recovery, how long a leg may still come back before it is given up
PROBE_ROUTE_AFTER_S = 1.0  # a leg out longer than this has its route's replicas probed (then once a second)


class Restart(Exception):
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
    h0_host: torch.Tensor | None = None  # h0 as sent: a CPU copy in the run's wire dtype
    head: asyncio.Future | None = None
    grad: asyncio.Future | None = None
    loss: float | None = None
    reroutes: int = 0  # hops replaced, restarts and recomputations
    recomputed: int = 0  # stages recomputed after their replica died in the backward
    outcome: str = "started"
    avoid: set[str] = field(default_factory=set)  # replicas that failed this microbatch: not offered again
    give_up_at: float = float("inf")  # monotonic time after which its current leg is abandoned (a failed recovery)
    call_s: float | None = None  # this node's forward call into the first replica, timed (schema.timing)
    labels: torch.Tensor | None = None  # the loss's targets where the data has a loss mask (-100: not trained on)

    def meta(self) -> dict:
        return schema.routed(self.route, self.order, self.origin, self.attempt)

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
    # stage -> (replicas that reported a weight hash after stepping, distinct hashes among them; 1: identical)
    weight_hashes: dict[int, tuple[int, int]] = field(default_factory=dict)
    resynced: int = 0  # replicas that differed from their stage's majority and were resynchronised

    def check(self) -> None:
        if self.started != self.finished + self.partial + self.lost:
            raise AssertionError(f"iteration {self.iteration}: accounting broken {asdict(self)}")


class FlightLegs(NodeBase):
    """A data node's microbatches on their routes: the forward leg (restarted elsewhere when a hop dies), the head's
    loss and backward, the backward leg (a replica that died after its forward is recomputed elsewhere), and the
    handlers relays call about a microbatch in flight. `DataNode` (gwtf.runtime.datanode) provides the rest."""

    flights: dict[int, Flight]
    iteration: int
    probes: ProbeCache
    head: Any  # gwtf.models.staged.HeadStage: embed / loss
    stage0: StageReplica
    recovery: RecoveryStrategy
    telemetry: Telemetry

    async def view(self) -> SwarmView:
        raise NotImplementedError

    async def current_nodes(self) -> dict[str, NodeRecord]:
        raise NotImplementedError

    async def _advance_stale(self, nodes: dict[str, NodeRecord]) -> None:
        raise NotImplementedError

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
            # Whole forward calls timed at their callers, for routers that learn from them (SWARM's balancer).
            timing = schema.timing(msg.meta.get("timing"), self.peer_id, None, fl.route[0], fl.call_s)
            for peer, seconds in schema.call_times({"timing": timing}):
                self.router.observe(peer, seconds)
        return self.message("ack")

    async def rpc_route(self, msg: Message) -> Message:
        """A relay's next hop died: give it (and remember) a new replica of that stage."""
        fl = self._current(msg)
        if fl is None:
            raise BadMessage(f"microbatch {msg.microbatch_id} is not in flight")
        dead, pos = str(msg.meta["dead"]), int(msg.meta["position"])
        self.telemetry.suspect(dead)  # the relay's call to it failed: probed off the critical path
        fl.avoid.add(dead)  # a full replica too: this hop has tried it already
        others = {r.peer_id for r in (await self.view()).replicas(fl.order[pos])} - fl.avoid
        new = await self._replace(fl, pos, set(fl.avoid) if others else {dead})
        return self.message("route", meta={"route": fl.route, "replica": new})

    async def rpc_fail(self, msg: Message) -> Message:
        """A relay of the route gave up forwarding this microbatch (no live next hop within its attempts): restart
        the microbatch now instead of waiting for the leg until the microbatch timeout."""
        fl = self._current(msg)
        if fl is not None and msg.sender in fl.route and fl.head is not None and not fl.head.done():
            fl.head.set_exception(Restart(f"relay {msg.sender[:8]} found no live next hop"))
        return self.message("ack")

    async def _replace(self, fl: Flight, pos: int, dead: set[str]) -> str:
        """A live replica for position `pos` of this microbatch's route; when its stage has none left (every replica
        lost), wait, bounded, for it to be rebuilt (gwtf.recovery) by a joiner."""
        stage = fl.order[pos]
        deadline = time.monotonic() + self.run.recovery.stage_timeout
        while (new := self.router.reroute(await self.view(), fl.by_stage(), stage, dead)) is None:
            if time.monotonic() > deadline:
                raise BadMessage(f"no live replica of stage {stage} for {self.run.recovery.stage_timeout:.0f}s")
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
        fl.recomputed += 1
        meta = fl.meta()
        if k == 0:
            if fl.h0 is None or fl.h0_host is None:  # a late recovery request: the embedding's backward already ran
                raise BadMessage(f"microbatch {fl.mb} has finished its backward")
            req = self.message(
                "recompute",
                iteration=self.iteration,
                microbatch_id=fl.mb,
                stage=0,
                tensors=[fl.h0_host, msg.tensors[0]],
                meta=meta,
            )
            peer, name = new, "recompute"
        else:
            req = self.message(
                "resend", iteration=self.iteration, microbatch_id=fl.mb, stage=0, tensors=[msg.tensors[0]], meta=meta
            )
            peer, name = fl.route[k - 1], "resend"
        try:
            await self.call(peer, name, req)
        except PeerError as exc:  # the upstream replica died too (neighbouring stages lost together): a refusal,
            # and the asking relay tells its upstream nothing more; this microbatch's backward ends partial
            raise BadMessage(f"microbatch {fl.mb}: recovering stage {fl.order[k]} failed: {exc}") from None
        log.info("mb %d: stage %d recomputed on %s", fl.mb, fl.order[k], new[:8])
        return self.message("ack")

    async def _run_flight(self, fl: Flight, report: IterationReport) -> None:
        report.started += 1
        report.tokens += fl.x.numel()
        hidden = await self._forward_leg(fl)
        if hidden is None:
            fl.outcome = "lost"
            report.lost += 1
            log.error("mb %d lost: no route through the swarm in %d attempts", fl.mb, self.run.iteration.max_attempts)
            return
        loss, grad = await self.compute(self._head_backward, hidden, fl.x if fl.labels is None else fl.labels)
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
        for attempt in range(self.run.iteration.max_attempts):
            fl.attempt = attempt
            loop = asyncio.get_running_loop()
            fl.head, fl.grad = loop.create_future(), loop.create_future()
            fl.give_up_at = float("inf")
            if attempt:
                fl.reroutes += 1
                await self._release(fl, attempt - 1)
                await self._drop_dead_hops(fl)
                await self._fresh_route(fl)
            fl.h0, fl.h0_host = await self.compute(self._embed, fl.x)
            try:
                await self._send_first(fl)
                return await self._await(fl, fl.head, on_dead=self._restart)
            except (PeerError, Restart) as exc:
                log.info("mb %d attempt %d: %s; restarting", fl.mb, attempt, exc)
        return None

    def stage_order(self, mb: int) -> list[int]:
        """The order a microbatch visits the relay stages: 1..S, or the run's recovery strategy's (CheckFree+ swaps
        stages 1,2 and S-1,S on half of the microbatches so each edge stage's partner learns to stand in for it)."""
        return list(self.recovery.stage_order(self.spec.model.n_stages, mb))

    async def _release(self, fl: Flight, attempt: int) -> None:
        """Best effort: the replicas of the old route drop what they hold of the abandoned attempt."""
        meta = schema.released(self.peer_id, attempt)
        msg = self.message("release", iteration=self.iteration, microbatch_id=fl.mb, meta=meta)
        calls = [self.call(p, "release", msg, timeout=1.0) for p in set(fl.route)]
        await asyncio.gather(*calls, return_exceptions=True)

    async def _drop_dead_hops(self, fl: Flight) -> None:
        """Before a restart: probe the route's replicas and those that failed this microbatch, and leave the gone
        ones out of every view. A stage that lost every replica a moment ago still has live records; without this the
        restarts went to its dead replicas and were all spent within a second (microbatches lost), where the route
        now waits, bounded by recovery.stage_timeout, for the stage to be rebuilt (`_replace`)."""
        await self._probe_gone(fl, set(fl.route) | fl.avoid)

    async def _probe_gone(self, fl: Flight, peers: set[str]) -> set[str]:
        """Probe `peers` (a flight's hops); those certainly gone are left out of every view and told to the telemetry
        with their stage on the flight's route. Returns them."""
        gone_now = await self.probes.gone(peers, timeout=PROBE_ROUTE_AFTER_S)
        if gone_now:
            self.telemetry.found_gone(sorted(gone_now), {p: k for p, k in zip(fl.route, fl.order)})
            self.found_gone(gone_now)
        return gone_now

    async def _fresh_route(self, fl: Flight) -> None:
        live = set(await self.live_nodes())
        for pos, peer in enumerate(list(fl.route)):
            if peer not in live:
                await self._replace(fl, pos, {peer})

    def leg_timeout(self, fl: Flight) -> float:
        """A leg's wait: the fixed microbatch timeout plus its activation crossing every hop of its route (and back
        to this node) at the run's floor bandwidth."""
        h = fl.h0
        nbytes = (len(fl.route) + 1) * (h.numel() * h.element_size() if h is not None else 0)
        return self.run.iteration.microbatch_timeout + transfer_s(nbytes, self.run.iteration.floor_bandwidth_mbps)

    async def _send_first(self, fl: Flight) -> None:
        assert fl.h0_host is not None
        deadline, pause, failures = time.monotonic() + self.leg_timeout(fl), 0.02, 0
        while failures < self.run.iteration.max_attempts and time.monotonic() < deadline:
            msg = self.message(
                "forward",
                iteration=self.iteration,
                microbatch_id=fl.mb,
                stage=0,
                tensors=[fl.h0_host],
                meta=fl.meta(),
            )
            try:
                sent = time.monotonic()
                await self.call(fl.route[0], "forward", msg)
                fl.call_s = time.monotonic() - sent
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
        deadline = time.monotonic() + self.leg_timeout(fl)
        next_probe = time.monotonic() + PROBE_ROUTE_AFTER_S
        while time.monotonic() < min(deadline, fl.give_up_at):
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout=0.25)
            except TimeoutError:
                live = await self.live_nodes()
                gone_now: set[str] = set()
                if time.monotonic() >= next_probe:  # a crashed hop's DHT record outlives it by up to its TTL: ask
                    gone_now = await self._probe_gone(fl, set(fl.route))
                    next_probe = time.monotonic() + PROBE_ROUTE_AFTER_S
                dead = [(pos, p) for pos, p in enumerate(fl.route) if p not in live or p in gone_now]
                if dead:
                    await on_dead(*dead[-1])
        if time.monotonic() >= fl.give_up_at:
            raise Restart(f"no answer within {RECOVERY_GRACE_S:.0f}s of a failed recovery")
        raise Restart(f"no answer within {self.leg_timeout(fl):.0f}s")

    async def _restart(self, pos: int, peer: str) -> None:
        raise Restart(f"replica {peer[:8]} at position {pos} of the route died")

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
                    meta = schema.recovering(fl.meta(), pos, peer)
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
        except Restart as exc:
            log.warning("mb %d: backward incomplete (%s)", fl.mb, exc)
            return False
        await self.compute(self._embed_backward, fl, g0)
        return True

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the embedding's output with its graph, on the device; its CPU copy in the wire dtype, to send)."""
        s = self.stage0
        with autocast(s.device, s.precision):
            h0 = self.head.embed(to_device(x, s.device))
        return h0, to_host(h0, s.wire)

    def _head_backward(self, hidden: torch.Tensor, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        s = self.stage0
        h = to_device(hidden.detach(), s.device).to(torch.float32).requires_grad_(True)
        with autocast(s.device, s.precision):
            loss = self.head.loss(h, to_device(x, s.device))
        loss.backward()
        self.stage0.count += 1
        self.stage0.stats.backward += 1
        assert h.grad is not None
        return float(loss.detach()), to_host(h.grad, s.wire)

    def _embed_backward(self, fl: Flight, g0: torch.Tensor) -> None:
        assert fl.h0 is not None
        if fl.h0.requires_grad:  # a frozen stage 0 (LoRA) has nothing to learn from it
            fl.h0.backward(to_device(g0, self.stage0.device).to(fl.h0.dtype))
        fl.h0 = None
