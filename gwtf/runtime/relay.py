"""The relay node: serves one stage's forward, backward and recompute for the microbatches routed through it, passes
each on along its route, and routes around a dead hop (ask the data node for another replica; a replica that died
after its forward is recovered by recomputing that one stage, design section 4)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import torch

from gwtf.device import to_host
from gwtf.errors import BadMessage, PeerError
from gwtf.membership import Membership, serving
from gwtf.runtime import schema
from gwtf.runtime.iteration_end import RelayIterationEnd
from gwtf.runtime.spec import NodeOptions, RunSpec
from gwtf.runtime.stage0_copy import Stage0Keeper
from gwtf.stage import timed
from gwtf.transport import Message, Transport

log = logging.getLogger(__name__)


class RelayNode(RelayIterationEnd):
    """Serves one stage: forward, backward, recompute; averages with its stage's replicas at each iteration end."""

    def __init__(self, spec: RunSpec, transport: Transport, membership: Membership, opts: NodeOptions, stage: int):
        super().__init__(spec, transport, membership, opts, stage)
        self.stage0_keeper = Stage0Keeper(self)
        self.missing_since: dict[str, float] = {}  # data nodes this replica holds microbatches of, not in the records
        handlers = {
            "regrad": self.rpc_regrad,
            "release": self.rpc_release,
            "forward": self.rpc_forward,
            "backward": self.rpc_backward,
            "recompute": self.rpc_recompute,
            "resend": self.rpc_resend,
            "end_iteration": self.rpc_end_iteration,
            "advance": self.rpc_advance,
            "resync": self.rpc_resync,
            "get_state": self.rpc_get_state,
            **self.recovery.handlers(self),
            **self.stage0_keeper.handlers(),  # a copy of stage 0 for data nodes (gwtf.runtime.stage0_copy)
        }
        for name, fn in handlers.items():
            transport.add_handler(name, fn, validator=functools.partial(self.validate, handler=name))

    def _check_iteration(self, msg: Message) -> None:
        assert self.replica is not None
        if msg.iteration > self.replica.version and self.catching_up is None:
            # The swarm stepped without this replica (it joined mid-iteration, or missed an end): fetch the state.
            self.catching_up = asyncio.ensure_future(self._catch_up(msg.iteration))
        if msg.iteration != self.replica.version:
            raise BadMessage(f"iteration {msg.iteration} but this replica is at version {self.replica.version}")
        self.routed_at = time.monotonic()
        key = self._key(msg)
        others = [*self.replica.held_keys(), *self.incoming]  # held, and acknowledged but not computed yet
        taken = {k for k in others if k[:2] != key[:2]}
        if len(taken) >= self.replica.capacity:
            raise BadMessage(f"replica full ({self.replica.capacity} microbatches held or arriving)")

    # ---- forward / backward ------------------------------------------------------------------------------------
    async def rpc_forward(self, msg: Message) -> Message:
        if self.replica is None:
            raise BadMessage("not serving yet")
        await self._drop_orphans()
        self._check_iteration(msg)
        self.incoming.add(self._key(msg))  # counted against capacity until its forward has run (or failed)
        self.spawn(self._forward(msg, time.monotonic()))
        return self.message("ack")

    async def _forward(self, msg: Message, arrived: float) -> None:
        assert self.replica is not None
        key = self._key(msg)
        try:
            await self.fault("forward", msg.iteration)
            out, took = await self.compute(timed, self.replica.forward, key, msg.tensors[0])
        finally:
            self.incoming.discard(key)
        # Timed inside the compute thread: the record's compute time is one forward's, not the wait behind the
        # others a relay holds (that made busy relays look slow to the routers and to joiners choosing a stage).
        self.compute_s = 0.8 * self.compute_s + 0.2 * took if self.compute_s else took
        self.recovery.on_forward(self, out)
        route, origin, pos = list(msg.meta["route"]), str(msg.meta["origin"]), self._pos(msg)
        serve_s = time.monotonic() - arrived  # queue + compute, for the callers' timing (schema.timing)
        if pos == len(route) - 1:
            self.timings[key] = (serve_s, None)
            await self._deliver(origin, "head", msg, out, route)
            return
        for _ in range(self.run.iteration.max_attempts):  # bounded: re-route around a dead next hop
            nxt = route[pos + 1]
            try:
                sent = time.monotonic()
                await self.call(nxt, "forward", self._relay_msg(msg, "forward", [out], route))
                self.timings[key] = (serve_s, time.monotonic() - sent)
                return
            except PeerError as exc:
                log.info(
                    "forward mb %d: next hop %s failed (%s); asking %s for a new one",
                    msg.microbatch_id,
                    nxt[:8],
                    exc,
                    origin[:8],
                )
                try:
                    route = await self._reroute(origin, msg, pos + 1, nxt, route)
                except PeerError as why:  # the data node has no replica to offer (or is gone itself)
                    log.info("forward mb %d: no new next hop (%s)", msg.microbatch_id, why)
                    break
        # Tell the data node now: it would otherwise wait for this leg until its microbatch timeout (30 s).
        fail = self.message("fail", iteration=msg.iteration, microbatch_id=msg.microbatch_id,
                            meta={"attempt": msg.meta.get("attempt", 0)})  # fmt: skip
        with contextlib.suppress(PeerError):
            await self.call(origin, "fail", fail)
        raise PeerError(f"forward of microbatch {msg.microbatch_id} found no live next hop")

    async def _reroute(self, origin: str, msg: Message, pos: int, dead: str, route: list[str]) -> list[str]:
        await self.fault("routing", msg.iteration)
        req = self.message(
            "route",
            microbatch_id=msg.microbatch_id,
            iteration=msg.iteration,
            meta={"position": pos, "dead": dead, "attempt": msg.meta.get("attempt", 0)},
        )
        reply = await self.call(origin, "route", req)
        return list(reply.meta["route"])

    async def _deliver(self, origin: str, name: str, msg: Message, tensor: torch.Tensor, route: list[str]) -> None:
        await self.call(origin, name, self._relay_msg(msg, name, [tensor], route))

    async def rpc_backward(self, msg: Message) -> Message:
        if self.replica is None:
            raise BadMessage("not serving yet")
        if self._key(msg) not in self.replica.held:
            raise BadMessage(f"no held forward for microbatch {msg.microbatch_id}")
        self.spawn(self._backward(msg, recompute=False))
        return self.message("ack")

    async def rpc_recompute(self, msg: Message) -> Message:
        if self.replica is None:
            raise BadMessage("not serving yet")
        if msg.iteration != self.replica.version:
            raise BadMessage(f"iteration {msg.iteration} but this replica is at version {self.replica.version}")
        self.spawn(self._backward(msg, recompute=True))
        return self.message("ack")

    async def _backward(self, msg: Message, recompute: bool) -> None:
        assert self.replica is not None
        key = self._key(msg)
        await self.fault("backward", msg.iteration)
        if recompute:
            grad_in = await self.compute(self.replica.recompute_backward, key, msg.tensors[0], msg.tensors[1])
        else:
            grad_in = await self.compute(self.replica.backward, key, msg.tensors[0])
        route, origin, pos = list(msg.meta["route"]), str(msg.meta["origin"]), self._pos(msg)
        self.sent_grads[key] = (grad_in, route)
        serve_s, call_s = self.timings.pop(key, (None, None)) if not recompute else (None, None)
        callee = route[pos + 1] if pos + 1 < len(route) else None
        timing = schema.timing(msg.meta.get("timing"), self.peer_id, serve_s, callee, call_s)
        if pos == 0:
            done = self._relay_msg(msg, "embed_grad", [grad_in], route)
            done.meta["timing"] = timing
            await self.call(origin, "embed_grad", done)
            return
        prev = route[pos - 1]
        back = self._relay_msg(msg, "backward", [grad_in], route)
        back.meta["timing"] = timing
        try:
            await self.call(prev, "backward", back)
        except PeerError as exc:
            # The previous stage's replica died after its forward: its upstream resends the activation to a new
            # replica, which recomputes that one stage (design.md section 4). The data node coordinates it.
            log.info("backward mb %d: replica %s before this one failed (%s); recovering", msg.microbatch_id,
                     prev[:8], exc)  # fmt: skip
            req = self._relay_msg(msg, "recover", [grad_in], route)
            req.meta = schema.recovering(req.meta, pos - 1, prev)
            await self.call(origin, "recover", req)

    async def _drop_orphans(self) -> None:
        """When full: what this replica holds for a data node whose record expired is dead weight (it died mid-step;
        until the relays step, a new data node's microbatches found no room, and its step was lost: issue 21). Only
        for a data node missing from the reads for a record's time to live (a loaded one may miss heartbeats), and
        only on a read that holds this relay's own record (an incomplete read would orphan live microbatches)."""
        assert self.replica is not None
        if len(self.replica.held) + len(self.incoming) < self.replica.capacity:
            return
        nodes = await self.live_nodes()
        live, now = serving(nodes, "data"), time.monotonic()
        if self.peer_id not in nodes:
            return
        missing = {k[0] for k in self.replica.held_keys() if k[0] not in live}
        self.missing_since = {o: self.missing_since.get(o, now) for o in missing}
        gone = {o for o, t in self.missing_since.items() if now - t >= self.run.membership.record_ttl_s}
        orphans = [k for k in self.replica.held_keys() if k[0] in gone]
        if orphans:
            dropped = await self.compute(self.replica.drop, orphans)  # 0 when a concurrent forward dropped them
            if dropped:
                log.info("relay %s dropped %d microbatches of data nodes no longer live", self.peer_id[:8], dropped)

    async def rpc_release(self, msg: Message) -> Message:
        """A data node restarted a microbatch: what this replica holds of its earlier attempts is dead weight."""
        if self.replica is not None:
            origin, attempt = str(msg.meta["origin"]), int(msg.meta["attempt"])
            mb = msg.microbatch_id
            keys = [k for k in self.replica.held_keys() if k[0] == origin and k[1] == mb and k[2] <= attempt]
            await self.compute(self.replica.drop, keys)
        return self.message("ack")

    async def rpc_regrad(self, msg: Message) -> Message:
        """The previous stage's replica died during its backward: recover it with the gradient sent to it."""
        sent = self.sent_grads.get(self._key(msg))
        if sent is None:
            raise BadMessage(f"no input gradient kept for microbatch {msg.microbatch_id}")
        grad_in, route = sent
        pos = route.index(self.peer_id)
        req = self._relay_msg(msg, "recover", [grad_in], route)
        req.meta = schema.recovering(req.meta, pos - 1, route[pos - 1])
        await self.call(str(msg.meta["origin"]), "recover", req)
        return self.message("ack")

    async def rpc_resend(self, msg: Message) -> Message:
        """Send this replica's held output of a microbatch to a new replica of the next stage, to recompute."""
        assert self.replica is not None
        held = self.replica.held.get(self._key(msg))
        if held is None:
            raise BadMessage(f"no held output for microbatch {msg.microbatch_id}")
        route = list(msg.meta["route"])
        out = await self.compute(to_host, held.out, self.replica.wire)  # a CPU copy in the run's dtype
        fwd = self._relay_msg(msg, "recompute", [out, msg.tensors[0]], route)
        await self.call(route[route.index(self.peer_id) + 1], "recompute", fwd)
        return self.message("ack")

    async def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.recovery.close()
        for t in self.tasks:
            t.cancel()
        await super().close()
