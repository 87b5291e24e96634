"""GWTF deployed: one agent per node of a live swarm, its messages over the runtime's transport.

`router = "gwtf-p2p"`. Every relay and every data node runs an `AgentService`: each `round_s` seconds it steps its
own `Agent` (gwtf.routing.agent, the simulator's code) with the messages that came in since its last round; what
the agent said goes out per destination peer, in order, one bounded call at a time (handler `gwtf_route`), without
holding up the next round. Rounds are not synchronized across nodes: a message sent in one node's round is read in
the receiver's next round, as on the simulator's bus, give or take the link's delay. What an agent knows: the peers'
DHT records (stage, region, measured compute time, capacity and the room the relay's agent last published), re-read
once a heartbeat, and its own messages. A peer whose record expired is dead to it (`Agent.peer_died`: only its
neighbours renegotiate); a read that lacks the node's own record is incomplete and changes nothing. A round that
raises is logged and counted (`stats`), and the next one goes on.

A data node reads its paths off its own agent (`P2PRouter`): `Route` messages bring each chain's relays up to it.
`gwtf` (gwtf.routing.gwtf_router) instead runs every agent inside each data node on its view of the swarm: the same
algorithm, without the messages.

Wire format (gwtf.routing.agent.codec): a call's `meta["m"]` is a list of messages, each `[type name, field, field,
...]` (tuples as lists). Every message is checked against its dataclass's field types and must name the
transport-stamped caller as its sender before the agent sees it; the agent then checks what it says (stages,
slots, numbers, capacity).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
from collections.abc import Callable

from gwtf.errors import BadMessage, PeerError, UserError
from gwtf.liveness import Answer, probe
from gwtf.routing.agent import Agent, AgentConfig, InProcessBus, PeerCard, decode, encode
from gwtf.routing.base import Plan, RoutedNode, Router, SwarmView
from gwtf.routing.config import RoutingConfig
from gwtf.routing.protocol import Directory, ViewCosts
from gwtf.transport import Message

log = logging.getLogger(__name__)

HANDLER = "gwtf_route"
MAX_MESSAGES = 256  # agent messages per call
MAX_CALL_BYTES = 24 << 10  # and about this much JSON (a call's meta may hold 64 KiB: gwtf.transport.MessageLimits)
MAX_INBOX = 4096  # agent messages waiting for the next round; beyond, calls are refused (the sender retries)
OWN_RECORD_WAIT_S = 30.0  # a starting agent re-reads the records this long for its own (a loaded DHT lags a store)
MAX_QUEUE = 4096  # agent messages waiting to go to one peer; beyond, the oldest are dropped (as the wire may)


# ----------------------------------------------------------------------------------------------- the service


def cards_of(view: SwarmView) -> dict[str, PeerCard]:
    cards = {p: PeerCard(p, r.stage, r.region, r.compute_s, r.capacity) for p, r in view.relays.items()}
    cards.update({p: PeerCard(p, 0, d.region, d.compute_s, 0) for p, d in view.data_nodes.items()})
    return cards


class AgentService:
    """One node's agent, stepped every `round_s` seconds.

    `node` is the node it runs in (gwtf.routing.base.RoutedNode: its transport, bounded calls, messages of its run,
    cached DHT records); `views(records)` turns the live records into a SwarmView of every serving node (figures and
    links). P2PRouter.start makes one; a node starts and closes it through its router."""

    def __init__(
        self,
        node: RoutedNode,
        stage: int,
        n_stages: int,
        views: Callable[[dict], SwarmView],
        cfg: AgentConfig | None = None,
        round_s: float = 0.1,
        seed: int = 0,
    ) -> None:
        if round_s <= 0:
            raise UserError(f"round_s must be positive (seconds between two routing rounds), got {round_s}")
        self.node, self.stage, self.n_stages, self.views = node, stage, n_stages, views
        # Data nodes start at different times here, unlike in the simulator: a late one must be able to take room
        # from one that holds two first hops or more (AgentConfig.evict), or it may wait for good.
        self.cfg = dataclasses.replace(cfg or AgentConfig(), routes=True, evict=True)
        self.round_s = round_s
        self.rng = random.Random(f"{seed}/{node.peer_id}")
        self.bus = InProcessBus()  # what the agent says in a round, by destination, for the pumps
        self.inbox: list = []
        self.agent: Agent | None = None
        self.cards: dict[str, PeerCard] = {}
        self.sinks: dict[str, str] = {}
        self.directory: Directory | None = None
        self.round_no = 0
        self.task: asyncio.Task | None = None
        self.refresher: asyncio.Task | None = None
        self.queues: dict[str, list] = {}  # per destination, in order; one call in flight per destination
        self.pumps: dict[str, asyncio.Task] = {}
        self.dropped = 0
        self.failed_calls = 0
        self.refused = 0  # calls refused by validation or a full inbox
        self.round_errors = 0  # rounds that raised (logged; the next round goes on)
        self.partial_reads = 0  # record reads that lacked this node's own record: not trusted (see _refresh)
        node.transport.add_handler(HANDLER, self.rpc_route)

    @property
    def me(self) -> str:
        return self.node.peer_id

    async def start(self, units: int = 0) -> None:
        """Read the records, make the agent (a data node with `units` microbatches per iteration), start rounds.
        The records are read again until they hold this node's own (announced before; its heartbeat writes it
        again), for at most OWN_RECORD_WAIT_S: one read of a DHT under load can miss a store made just before."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + OWN_RECORD_WAIT_S, 0.1
        await self._refresh(max_age=0)
        while (card := self.cards.get(self.me)) is None:
            if loop.time() + delay > deadline:
                raise PeerError(f"{self.me}: its own record was not in the DHT {OWN_RECORD_WAIT_S:g}s after it was "
                                "announced; the DHT is unreachable or refuses this node's records")  # fmt: skip
            log.info("%s: the records lack this node's own yet; reading them again in %.1fs", self.me[:8], delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, self.node.run.membership.heartbeat_s)
            await self._refresh(max_age=0)
        assert self.directory is not None
        agent = Agent(
            card, self.n_stages, self.directory.costs, self.bus, self.sinks, self.cfg, self.rng.randrange(2**31)
        )
        agent.known = self.cards
        if units:
            agent.add_units(units)
        agent.meet(self.directory, newcomer=True)
        self.agent = agent
        self.task = asyncio.ensure_future(self._rounds())
        self.refresher = asyncio.ensure_future(self._refreshes())

    def room(self) -> int:
        """The room this relay's agent has left, for its DHT record (the directory's `spare`)."""
        return self.agent.spare if self.agent is not None else -1

    async def close(self) -> None:
        tasks = [t for t in (self.task, self.refresher, *self.pumps.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.info("%s: routing agent stopped after %d rounds: %s", self.me[:8], self.round_no, self.stats())

    def stats(self) -> dict[str, float]:
        rounds = max(self.round_no, 1)
        agent = self.agent
        return {
            "messages_per_round": round(self.bus.sent / rounds, 2),
            "failed_calls": self.failed_calls,
            "dropped_messages": self.dropped,
            "refused_calls": self.refused,
            "rejected_messages": agent.rejected if agent is not None else 0,
            "round_errors": self.round_errors,
            "partial_reads": self.partial_reads,
        }

    async def rpc_route(self, msg: Message) -> Message:
        entries = msg.meta.get("m")
        if not isinstance(entries, list) or len(entries) > MAX_MESSAGES:
            self.refused += 1
            raise BadMessage(f"gwtf_route carries a list of at most {MAX_MESSAGES} agent messages")
        if len(self.inbox) + len(entries) > MAX_INBOX:
            self.refused += 1
            raise BadMessage("gwtf_route: inbox full, try next round")
        try:
            decoded = [decode(e, msg.sender) for e in entries]
        except BadMessage:
            self.refused += 1
            raise
        self.inbox.extend(decoded)
        return Message(kind="ok", run_id=msg.run_id)

    # ---- rounds ----------------------------------------------------------------------------------------------------
    # A round never waits on the network: the agent steps every `round_s` seconds on what has arrived, what it says
    # is queued per destination and sent by one pump per destination (in order, one call at a time), and the DHT
    # records are re-read by their own task once a heartbeat. A slow peer or a slow DHT read delays only itself.

    async def _rounds(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.node.closed:
            t0 = loop.time()
            try:
                self.round()
            except Exception:  # a bug in one round must not stop the agent for good (it did, silently: issue 21)
                self.round_errors += 1
                if self.round_errors in (1, 10, 100) or self.round_errors % 1000 == 0:
                    log.exception(
                        "%s: routing round %d failed (%d so far)", self.me[:8], self.round_no, self.round_errors
                    )
                self.round_no += 1
            await asyncio.sleep(max(0.0, self.round_s - (loop.time() - t0)))

    def round(self) -> None:
        """One round: the agent's step on the messages that came in, its messages queued for the pumps."""
        agent = self.agent
        assert agent is not None and self.directory is not None
        inbox, self.inbox = self.inbox, []
        agent.step(self.round_no, inbox, self.directory)
        self.round_no += 1
        for dst, msgs in self.bus.take().items():
            queue = self.queues.setdefault(dst, [])
            queue.extend(msgs)
            if len(queue) > MAX_QUEUE:
                self.dropped += len(queue) - MAX_QUEUE
                del queue[: len(queue) - MAX_QUEUE]
            pump = self.pumps.get(dst)
            if pump is None or pump.done():
                self.pumps[dst] = asyncio.ensure_future(self._pump(dst))

    async def _pump(self, dst: str) -> None:
        timeout = min(self.node.run.transport.call_timeout, max(1.0, 10 * self.round_s))
        queue = self.queues.get(dst)
        while queue and not self.node.closed:
            batch: list[list] = []
            size = 0
            while queue and len(batch) < MAX_MESSAGES and size < MAX_CALL_BYTES:
                batch.append(encode(queue.pop(0)))
                size += len(json.dumps(batch[-1]))
            msg = self.node.message(HANDLER, meta={"m": batch})
            try:
                await self.node.call(dst, HANDLER, msg, timeout=timeout)
            except PeerError as exc:  # lost messages are the protocol's normal case (requests expire)
                self.failed_calls += 1
                log.debug("%s: routing messages to %s not delivered (%s)", self.me[:8], dst[:8], exc)
                await self._check_gone(dst, exc)
        if not queue:
            self.queues.pop(dst, None)

    async def _check_gone(self, dst: str, exc: PeerError) -> None:
        """A call refused or reset (not one that timed out) may mean `dst` died: probed, and if it is certainly gone
        the node leaves it out of its records (`found_gone`), so the agent renegotiates at its next read instead of
        when the record expires (a fast run may end first: a SIGKILLed relay kept its slots for the whole run)."""
        found_gone = getattr(self.node, "found_gone", None)
        if found_gone is None or str(exc).startswith("timeout") or dst in getattr(self.node, "gone", {}):
            return
        if await probe(self.node.transport, dst, timeout=min(self.node.run.transport.call_timeout, 3.0)) is Answer.GONE:
            found_gone([dst])

    async def _refreshes(self) -> None:
        while not self.node.closed:
            await asyncio.sleep(self.node.run.membership.heartbeat_s)
            try:
                await self._refresh()
            except Exception as exc:  # noqa: BLE001 (a DHT hiccup: the agent goes on with what it knew)
                log.info("%s: routing records not refreshed (%s)", self.me[:8], exc)

    async def _refresh(self, max_age: float | None = None) -> None:
        """Re-read the records: who is there (peers whose record expired are dead), their figures and room."""
        records = await self.node.live_nodes(max_age=max_age)
        if self.agent is not None and self.me not in records:
            # Our own heartbeat keeps our record live, so a read without it is incomplete (a DHT get that reached
            # too few peers, or none): acting on it would declare every peer it missed dead, and `peer_died` drops
            # their slots without telling them, so neither side would give those slots back.
            self.partial_reads += 1
            log.info("%s: a read of the records lacked this node's own; the routing view is kept", self.me[:8])
            return
        view = self.views(records)
        cards = cards_of(view)
        directory = Directory(ViewCosts(view))
        for card in sorted(cards.values(), key=lambda c: c.peer_id):
            directory.add(card)
            room = getattr(records.get(card.peer_id), "room", -1)
            if card.stage and isinstance(room, int) and room >= 0:
                directory.spare[card.peer_id] = min(room, card.capacity)
        gone = set(self.cards) - set(cards) - {self.me}
        self.cards.clear()
        self.cards.update(cards)
        self.sinks.clear()
        for peer in sorted(view.data_nodes):
            self.sinks.setdefault(str(view.data_nodes[peer].region), peer)
        self.directory = directory
        agent = self.agent
        if agent is None:
            return
        agent.costs = directory.costs
        mine = cards.get(self.me)
        if mine is not None and mine != agent.card:
            agent.card = mine  # measured compute time: the adverts and prefixes use it from now on
        for peer in sorted(gone):
            agent.peer_died(peer)


# ------------------------------------------------------------------------------------------------ the router


class P2PRouter(Router):
    """Every node's own agent: a relay's (stage >= 1) negotiates its slots, a data node's (stage 0) its paths, which
    `plan` reads off it. `start` makes and starts the node's AgentService (rounds every `routing.round_s`), `close`
    stops it, `room` is what the relay's agent has left for its DHT record."""

    name = "gwtf-p2p"

    def __init__(self, seed: int = 0, routing: RoutingConfig | None = None) -> None:
        super().__init__(seed, routing)
        self.service: AgentService | None = None
        self.me = ""

    async def start(self, node: RoutedNode, stage: int, views: Callable[[dict], SwarmView], units: int = 0) -> None:
        """This node's own agent (a relay's, or a data node's with `units` microbatches per iteration), in rounds
        until the node closes."""
        n_stages = node.spec.model.n_stages
        service = AgentService(node, stage, n_stages, views, cfg=AgentConfig(**self.routing.agent_moves()),
                               round_s=self.routing.round_s, seed=self.seed)  # fmt: skip
        await service.start(units)
        self.attach(service)

    async def close(self) -> None:
        if self.service is not None:
            await self.service.close()

    def room(self) -> int:
        return self.service.room() if self.service is not None else -1

    def attach(self, service: AgentService) -> None:
        """Read the paths off `service` (`start` attaches the one it made; kept for callers that make their own)."""
        self.service, self.me = service, service.me

    def plan(self, view: SwarmView, demands: dict[str, int]) -> Plan:
        """This data node's complete paths through relays the view routes through (at the iteration's version),
        cheapest first; the other data nodes' agents give theirs."""
        service = self.service
        if service is None or service.agent is None:
            raise UserError("router gwtf-p2p runs inside a data node: its AgentService must be started first")
        ok = view.relays
        paths = [p for p in service.agent.paths() if all(r in ok and ok[r].stage == k for k, r in enumerate(p, 1))]
        return self._record({self.me: paths[: demands.get(self.me, len(paths))]})
