"""The decentralized GWTF agent: one per node, local knowledge only, messages through a bus.

Paths form backwards from the sinks, as reserved chains. A *slot* is one microbatch of room on a link: relay i
holds slot n at next-stage relay j once j granted it; j pairs each slot it granted (an *in-slot*) with one slot
it holds downstream (an *out-slot*), so a chain of paired slots runs to the last stage, which returns the
microbatch to its own data node. Every relay reserves downstream slots up to its capacity from round 0, all
stages in parallel, so a relay's `ready` count (in-slots it can still grant, each backed by a chain to a sink)
is known after a few rounds everywhere; a data node's microbatch (a unit) then needs one request to a stage-1
relay with room, not one round per hop. A slot carries a *label*: the origin region of the microbatch riding
it (None while it is only reserved); labels flow down the chains and every relay pairs each labelled in-slot
with the out-slot that is cheapest for that region (link + advertised cost-to-sink), re-pairing locally when a
better idle chain appears (improvement with simulated annealing: a worse re-pairing is taken with probability
exp(-delta / T), T decaying). Messages per node and round:
- `Advert` (ready + cost-to-sink per sink region, distance-vector style) to the upstream peers that keep me as
  a candidate, only when it changed;
- `Request` of new slots, or new labels for slots already held (batched per peer); `Reply` grants or rejects;
- `Lost`: downstream revokes slots it cannot continue (it has no chain for them and no peer with room);
  `Release`: upstream gives slots back. A revoked or released slot frees the chain behind it for others.
Crashes: a node told that a peer died drops the slots it held there (and re-pairs their flow on other chains)
and the slots it granted to it (their chains stay reserved, ready for others). Joins: `Hello`.

Local knowledge: candidate sets are bounded (`AgentConfig.neighbours` per stage, cheapest links first), so
messages per node per round do not grow with the swarm. Trust: every message is validated (sender is a known
peer of the right stage, numbers finite, lists bounded, slots known). A relay never grants more in-slots than
its own capacity, so a peer lying about its capacity or cost can attract slots but cannot make another node
hold more than its capacity.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

from gwtf.errors import BadMessage

logger = logging.getLogger(__name__)

INF = float("inf")
SlotKey = tuple[str, int]  # (upstream peer, its slot number)
MAX_BATCH = 64  # slots per message: bounded lists
EXPIRY_ROUNDS = 3  # a request is answered in 2 rounds (request, reply)


# ------------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Advert:
    sender: str
    stage: int
    spare: int  # ready: slots it can still grant, each backed by a chain to a sink
    compute_s: float
    cost: tuple[tuple[str, float], ...]  # (sink region, cost-to-sink including the sender's compute)


@dataclass(frozen=True)
class Hello:
    sender: str
    stage: int


@dataclass(frozen=True)
class Request:
    """Grant me these slots (or: these slots I hold now carry this label; "" = none)."""

    sender: str
    slots: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class Reply:
    sender: str
    accepted: tuple[int, ...]
    rejected: tuple[int, ...]
    spare: int


@dataclass(frozen=True)
class Lost:
    """Downstream revokes slots: it cannot continue them."""

    sender: str
    slots: tuple[int, ...]


@dataclass(frozen=True)
class Release:
    """Upstream gives slots back."""

    sender: str
    slots: tuple[int, ...]


Message = Advert | Hello | Request | Reply | Lost | Release


class Bus(Protocol):
    """Delivers messages between agents: the simulator's in-process bus, or the runtime's transport."""

    def send(self, dst: str, msg: Message) -> None: ...


@dataclass
class InProcessBus:
    """Messages sent in round t are delivered in round t+1; messages to dead peers vanish."""

    inboxes: dict[str, list[Message]] = field(default_factory=lambda: defaultdict(list))
    sent: int = 0
    dead: set[str] = field(default_factory=set)

    def send(self, dst: str, msg: Message) -> None:
        self.sent += 1
        if dst not in self.dead:
            self.inboxes[dst].append(msg)

    def take(self) -> dict[str, list[Message]]:
        out, self.inboxes = self.inboxes, defaultdict(list)
        return out


# ---------------------------------------------------------------------------------------------------- agent


@dataclass(frozen=True)
class PeerCard:
    """What the DHT record of a peer says (and what the agent may know of another peer)."""

    peer_id: str
    stage: int
    region: str | None
    compute_s: float
    capacity: int


class Costs(Protocol):
    def link(self, a: str, b: str) -> float: ...


@dataclass
class AgentConfig:
    neighbours: int = 6  # candidates kept per adjacent stage
    lookup: int = 3  # fresh candidates per directory lookup
    patience: int = 2  # rounds an in-slot may wait for a chain before it is revoked
    temperature0: float = 0.02  # seconds; annealing temperature of round 0
    cooling: float = 0.6
    margin: float = 1e-3  # seconds: smaller gains are not worth a re-pairing

    def __post_init__(self) -> None:
        if self.neighbours < 1 or self.lookup < 1 or self.patience < 1 or not 0 < self.cooling < 1:
            raise ValueError("AgentConfig: neighbours, lookup, patience >= 1 and 0 < cooling < 1")


@dataclass
class InSlot:
    label: str | None  # origin region of the microbatch riding it; None while only reserved
    out: int | None = None  # the out-slot it continues on
    waited: int = 0


@dataclass
class OutSlot:
    peer: str
    held: bool = False  # granted by peer
    paired: SlotKey | None = None  # the in-slot it carries (a data node: its own unit)
    label: str | None = None
    sent_label: str | None = None  # the label the peer knows
    asked: int = 0  # round the slot was requested: an unanswered request expires


@dataclass
class NeighbourState:
    card: PeerCard
    spare: int
    cost: dict[str, float] = field(default_factory=dict)


class Agent:
    """One node's routing state machine. Stage 0 is a data node (source and sink of its units)."""

    def __init__(
        self,
        card: PeerCard,
        n_stages: int,
        costs: Costs,
        bus: Bus,
        sink_regions: dict[str, str],
        cfg: AgentConfig,
        seed: int,
    ) -> None:
        self.card, self.n_stages, self.costs, self.bus, self.cfg = card, n_stages, costs, bus, cfg
        self.sink_regions = sink_regions  # region -> a data node there (stage-S nodes price the last hop)
        self.rng = random.Random(seed)
        self.inbound: dict[SlotKey, InSlot] = {}
        self.outbound: dict[int, OutSlot] = {}
        self.next_no = 0
        self.demand = 0  # a data node's microbatches
        self.next: dict[str, NeighbourState] = {}
        self.subscribers: set[str] = set()  # upstream peers that keep me as a candidate
        self.known: dict[str, PeerCard] = {}
        self.my_cost: dict[str, float] = {}
        self.last_advert: tuple | None = None
        self.rejected = 0  # invalid messages dropped
        self.round_no = 0
        self._requests: dict[str, list[tuple[int, str]]] = defaultdict(list)

    # ------------------------------------------------------------------------------------------ bookkeeping

    @property
    def me(self) -> str:
        return self.card.peer_id

    @property
    def is_data(self) -> bool:
        return self.card.stage == 0

    @property
    def is_last(self) -> bool:
        return self.card.stage == self.n_stages

    @property
    def target(self) -> int:
        """Out-slots wanted: a data node's microbatches, a relay's capacity (chains reserved ahead)."""
        return self.demand if self.is_data else self.card.capacity

    @property
    def spare(self) -> int:
        """Ready: in-slots this node can still grant, each with a chain behind it."""
        if self.is_data:
            return 0
        room = self.card.capacity - len(self.inbound)
        if self.is_last:
            return max(room, 0)
        return max(0, min(room, len(self._idle_outs())))

    @property
    def load(self) -> int:
        return len(self.inbound)

    def learn(self, card: PeerCard) -> None:
        self.known[card.peer_id] = card

    def add_next(self, card: PeerCard) -> None:
        self.learn(card)
        if card.peer_id not in self.next:
            self.next[card.peer_id] = NeighbourState(card, card.capacity)
            self.bus.send(card.peer_id, Hello(self.me, self.card.stage))

    def add_same(self, card: PeerCard) -> None:
        self.learn(card)  # same-stage peers: known records (no moves between them in the chain protocol)

    def add_units(self, count: int) -> None:
        """A data node's microbatches for this iteration."""
        self.demand += count

    def units(self) -> list[tuple[int, OutSlot]]:
        """A data node's microbatches that have a first hop."""
        return sorted((n, o) for n, o in self.outbound.items() if o.held)

    def _idle_outs(self) -> list[int]:
        return [n for n, o in self.outbound.items() if o.held and o.paired is None]

    # --------------------------------------------------------------------------------------------- a round

    def step(self, round_no: int, inbox: list[Message], directory) -> None:
        self.round_no = round_no
        for msg in inbox:
            try:
                self._handle(msg)
            except BadMessage as exc:
                self.rejected += 1
                logger.debug("%s dropped %s: %s", self.me, type(msg).__name__, exc)
        if not self.is_last:
            self._expire()
            self._pair()
            self._improve()
            self._trim()
            self._reserve(directory)
            self._upgrade()
            self._give_up()
            self._send_labels()
        self._flush()
        self._advertise()

    def peer_died(self, peer: str) -> None:
        """Local renegotiation: flow on slots held at `peer` moves to other chains; its in-slots are dropped."""
        self.next.pop(peer, None)
        self.subscribers.discard(peer)
        for n in [n for n, o in self.outbound.items() if o.peer == peer]:
            self._drop_out(n)
        for key in [k for k in self.inbound if k[0] == peer]:
            self._drop_in(key)

    # -------------------------------------------------------------------------------------------- handlers

    def _handle(self, msg: Message) -> None:
        card = self.known.get(msg.sender)
        if card is None:
            raise BadMessage(f"unknown sender {msg.sender}")
        handler = getattr(self, f"_on_{type(msg).__name__.lower()}")
        handler(msg, card)

    def _expect_stage(self, card: PeerCard, stage: int) -> None:
        if card.stage != stage:
            raise BadMessage(f"sender is not a stage-{stage} peer")

    def _on_hello(self, msg: Hello, card: PeerCard) -> None:
        if card.stage != msg.stage:
            raise BadMessage("hello from a peer without a matching record")
        if card.stage == self.card.stage - 1:
            self.subscribers.add(card.peer_id)
            self.last_advert = None  # the newcomer needs our figures
        elif card.stage == self.card.stage + 1 and len(self.next) < 2 * self.cfg.neighbours:
            self.add_next(card)  # a newcomer next door: a candidate for our slots

    def _on_advert(self, msg: Advert, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage + 1)
        if not (math.isfinite(msg.compute_s) and msg.compute_s >= 0 and len(msg.cost) <= len(self.sink_regions)):
            raise BadMessage("malformed advert")
        if any(not (isinstance(g, str) and c >= 0) for g, c in msg.cost):
            raise BadMessage("negative or NaN cost")
        state = self.next.get(msg.sender)
        if state is not None:  # adverts from peers we did not choose are ignored: bounded state
            state.spare = max(0, min(msg.spare, card.capacity))  # never believe more than the record's capacity
            state.cost = dict(msg.cost)

    def _on_request(self, msg: Request, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage - 1)
        fresh = sum(1 for n, _ in msg.slots if (msg.sender, n) not in self.inbound)
        if len(msg.slots) > MAX_BATCH or fresh > max(self.card.capacity, 1):
            raise BadMessage(f"request for {fresh} new slots, more than our recorded capacity")
        accepted, rejected = [], []
        for n, label in msg.slots:
            if not isinstance(n, int) or not (label == "" or label in self.sink_regions):
                rejected.append(n)
                continue
            key = (msg.sender, n)
            slot = self.inbound.get(key)
            if slot is not None:
                slot.label = label or None  # a relabel of a slot already granted: it travels down the chain
                if slot.out is not None and slot.out in self.outbound:
                    self.outbound[slot.out].label = slot.label
            elif len(self.inbound) < self.card.capacity:
                self.inbound[key] = InSlot(label or None)
                accepted.append(n)
            else:
                rejected.append(n)
        if accepted or rejected:
            self.bus.send(msg.sender, Reply(self.me, tuple(accepted), tuple(rejected), self.spare))

    def _on_reply(self, msg: Reply, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage + 1)
        for n in msg.accepted:
            out = self.outbound.get(n)
            if out is not None and out.peer == msg.sender:
                out.held = True
            else:  # we no longer want it there
                self.bus.send(msg.sender, Release(self.me, (n,)))
        for n in msg.rejected:
            out = self.outbound.get(n)
            if out is not None and out.peer == msg.sender and not out.held:
                self._drop_out(n)
        state = self.next.get(msg.sender)
        if state is not None:
            state.spare = max(0, min(msg.spare, card.capacity))

    def _on_lost(self, msg: Lost, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage + 1)
        for n in msg.slots:
            out = self.outbound.get(n)
            if out is not None and out.peer == msg.sender:
                self._drop_out(n)
        if msg.sender in self.next:
            self.next[msg.sender].spare = 0

    def _on_release(self, msg: Release, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage - 1)
        for n in msg.slots:
            if (msg.sender, n) in self.inbound:
                self._drop_in((msg.sender, n))

    def _drop_out(self, n: int) -> None:
        out = self.outbound.pop(n)
        if out.paired is not None and out.paired in self.inbound:
            self.inbound[out.paired].out = None

    def _drop_in(self, key: SlotKey) -> None:
        slot = self.inbound.pop(key)
        if slot.out is not None and slot.out in self.outbound:
            out = self.outbound[slot.out]
            out.paired, out.label = None, None  # the chain behind stays reserved, ready for others

    # ------------------------------------------------------------------------------------------- decisions

    def _value(self, n: int, label: str | None) -> float:
        """Cost of carrying a microbatch of `label` on out-slot n: link + the peer's cost-to-sink."""
        peer = self.outbound[n].peer
        return self._estimate(peer, label)

    def _estimate(self, peer: str, label: str | None) -> float:
        region = label if label is not None else self._home()
        state = self.next.get(peer)
        card = self.known[peer]
        if state is not None and region in state.cost:
            return self.costs.link(self.me, peer) + state.cost[region]
        # not advertised yet: assume the rest of the path stays in that peer's region, then returns
        rest = (self.n_stages - card.stage + 1) * card.compute_s
        return self.costs.link(self.me, peer) + rest + self.costs.link(peer, self.sink_regions[region])

    def _home(self) -> str:
        """The sink region an unlabelled slot most likely serves: the nearest one."""
        return min(self.sink_regions, key=lambda g: (self.costs.link(self.me, self.sink_regions[g]), g))

    def _pair(self) -> None:
        """Every in-slot (a data node: every unit) continues on an idle chain; a microbatch (labelled in-slot)
        with none takes the chain of a mere reservation, which then waits for another or is revoked."""
        idle = self._idle_outs()
        if self.is_data:
            return self._pair_units(idle)
        waiting = [k for k, s in self.inbound.items() if s.out is None]
        waiting.sort(key=lambda k: (self.inbound[k].label is None, k))
        for key in waiting:
            slot = self.inbound[key]
            if not idle and slot.label is not None:
                idle = self._unlabelled_outs()[:1]
                if idle:
                    self._unlink(idle[0])
            if not idle:
                continue
            best = min(idle, key=lambda n: (self._value(n, slot.label), n))
            idle.remove(best)
            self._link(key, best)

    def _unlabelled_outs(self) -> list[int]:
        return sorted(
            n
            for n, o in self.outbound.items()
            if o.held and o.paired is not None and o.paired in self.inbound and self.inbound[o.paired].label is None
        )

    def _unlink(self, n: int) -> None:
        out = self.outbound[n]
        if out.paired is not None and out.paired in self.inbound:
            self.inbound[out.paired].out = None
        out.paired, out.label = None, None

    def _pair_units(self, idle: list[int]) -> None:
        for n in idle:
            out = self.outbound[n]
            out.paired, out.label = (self.me, n), self.card.region

    def _link(self, key: SlotKey, n: int) -> None:
        slot, out = self.inbound[key], self.outbound[n]
        slot.out, slot.waited = n, 0
        out.paired, out.label = key, slot.label

    def _improve(self) -> None:
        """Re-pair labelled in-slots on cheaper idle chains (annealing: a worse one now and then, early on)."""
        if self.is_data:
            return
        idle = self._idle_outs()
        temperature = self.cfg.temperature0 * self.cfg.cooling**self.round_no
        for key, slot in sorted(self.inbound.items()):
            if not idle or slot.label is None or slot.out is None or slot.out not in self.outbound:
                continue
            here = self._value(slot.out, slot.label)
            best = min(idle, key=lambda n: (self._value(n, slot.label), n))
            delta = self._value(best, slot.label) - here
            if delta < -self.cfg.margin or (delta > 0 and self._anneal(delta, temperature)):
                old = slot.out
                idle.remove(best)
                self.outbound[old].paired, self.outbound[old].label = None, None
                self._link(key, best)
                idle.append(old)

    def _anneal(self, delta: float, temperature: float) -> bool:
        return temperature > 1e-6 and self.rng.random() < math.exp(-delta / temperature)

    def _reserve(self, directory) -> None:
        """Request slots up to the target at the cheapest next-stage peers believed to have room."""
        need = self.target - len(self.outbound)
        if need <= 0:
            return
        believed = {p: st.spare for p, st in self.next.items()}
        if sum(believed.values()) < need:
            self._refresh(directory)
            believed = {p: st.spare for p, st in self.next.items()}
        label = self.card.region if self.is_data else None
        for _ in range(need):
            options = [
                (self._estimate(p, label) * (1 + 0.05 * self.rng.random()), p) for p, s in believed.items() if s > 0
            ]
            if not options:
                return
            peer = min(options)[1]
            believed[peer] -= 1
            n = self.next_no
            self.next_no += 1
            self.outbound[n] = OutSlot(peer, label=label, asked=self.round_no)
            self._requests[peer].append((n, label or ""))

    def _upgrade(self) -> None:
        """Reserve a cheaper chain for a microbatch when a next-stage peer with room beats its current one; the
        microbatch moves over in `_improve` once it is granted, and surplus idle chains go back in `_trim`."""
        if self.is_data or len(self.outbound) > self.target:
            return
        believed = {p: st.spare for p, st in self.next.items() if st.spare > 0}
        for _key, slot in sorted(self.inbound.items()):
            if not believed:
                return
            if slot.label is None or slot.out is None or slot.out not in self.outbound:
                continue
            here = self._value(slot.out, slot.label)
            peer = min(believed, key=lambda p: (self._estimate(p, slot.label), p))
            if self._estimate(peer, slot.label) < here - self.cfg.margin:
                believed[peer] -= 1
                if believed[peer] == 0:
                    del believed[peer]
                n = self.next_no
                self.next_no += 1
                self.outbound[n] = OutSlot(peer, asked=self.round_no)
                self._requests[peer].append((n, ""))
                return  # one per round: bounded messages, and the adverts catch up

    def _trim(self) -> None:
        """Give back idle chains beyond the target, the costliest first."""
        extra = len(self.outbound) - self.target
        if extra <= 0:
            return
        idle = sorted(self._idle_outs(), key=lambda n: (-self._value(n, None), n))
        for n in idle[:extra]:
            out = self.outbound.pop(n)
            self.bus.send(out.peer, Release(self.me, (n,)))

    def _expire(self) -> None:
        """A request unanswered for longer than a round trip (the peer dropped it, or it died) is given up, so
        the slot it stands for is reserved elsewhere instead of blocking a chain forever."""
        for n in [n for n, o in self.outbound.items() if not o.held and self.round_no - o.asked > EXPIRY_ROUNDS]:
            out = self.outbound[n]
            self._drop_out(n)
            self.bus.send(out.peer, Release(self.me, (n,)))  # in case the grant is still on its way
            if out.peer in self.next:
                self.next[out.peer].spare = 0

    def _give_up(self) -> None:
        """Revoke in-slots that found no chain for `patience` rounds: upstream re-pairs them elsewhere."""
        lost: dict[str, list[int]] = defaultdict(list)
        pending = sum(1 for o in self.outbound.values() if not o.held)
        waiting = sorted(
            (k for k, s in self.inbound.items() if s.out is None), key=lambda k: (self.inbound[k].label is not None, k)
        )
        for key in waiting[pending:]:  # in-slots that no reservation in flight can serve
            slot = self.inbound[key]
            slot.waited += 1
            if slot.waited >= self.cfg.patience + (slot.label is None):
                del self.inbound[key]
                lost[key[0]].append(key[1])
        for dst, ns in lost.items():
            self.bus.send(dst, Lost(self.me, tuple(ns)))

    def _send_labels(self) -> None:
        for n, out in self.outbound.items():
            if out.held and out.label != out.sent_label:
                out.sent_label = out.label
                self._requests[out.peer].append((n, out.label or ""))

    def _flush(self) -> None:
        for dst, slots in self._requests.items():
            for k in range(0, len(slots), MAX_BATCH):
                self.bus.send(dst, Request(self.me, tuple(slots[k : k + MAX_BATCH])))
        self._requests.clear()

    def _advertise(self) -> None:
        if self.is_data:
            return
        cost = self._cost_to_sink()
        self.my_cost = cost
        advert_key = (self.spare, tuple(sorted((g, round(c, 4)) for g, c in cost.items())))
        if advert_key == self.last_advert:
            return
        self.last_advert = advert_key
        msg = Advert(self.me, self.card.stage, advert_key[0], self.card.compute_s, advert_key[1])
        for peer in sorted(self.subscribers):
            self.bus.send(peer, msg)

    def _cost_to_sink(self) -> dict[str, float]:
        c = self.card.compute_s
        if self.is_last:
            return {g: c + self.costs.link(self.me, rep) for g, rep in self.sink_regions.items()}
        idle = self._idle_outs() or [n for n, o in self.outbound.items() if o.held]
        out: dict[str, float] = {}
        for g in self.sink_regions:
            best = min((self._value(n, g) for n in idle), default=INF)
            out[g] = c + best if best < INF else c + min((self._estimate(p, g) for p in self.next), default=1e6)
        return out

    def _refresh(self, directory) -> None:
        """Ask the DHT directory for next-stage peers with spare capacity (bounded), cheapest links first."""
        for card in directory.lookup(self.card.stage + 1, self.me, self.cfg.lookup, self.rng):
            if card.peer_id not in self.next:
                self._evict_idle_next()
                self.add_next(card)

    def _evict_idle_next(self) -> None:
        if len(self.next) < 2 * self.cfg.neighbours:
            return
        used = {o.peer for o in self.outbound.values()}
        idle = [p for p, st in self.next.items() if p not in used and st.spare == 0]
        if idle:
            del self.next[self.rng.choice(sorted(idle))]
