"""The decentralized GWTF agent: one per node, local knowledge only, messages through a bus.

Every node runs an `Agent`. Data nodes are stage 0: they own their microbatches ("units") and are their sink.
A unit lives in a chain of slots, one per relay stage; every slot knows its unit's upstream and downstream peer.
A round: each agent reads its inbox, then sends messages. Per round and node:
- `Advert` (cost-to-sink per sink region + spare capacity), to subscribed upstream nodes and same-stage
  neighbours, only when it changed (triggered updates, as in distance-vector routing);
- `Request` of next hops for unplaced units, to the candidate minimising link + advertised cost; the receiver
  accepts within its own capacity (`Reply`); units it cannot place for a few rounds go back (`Lost`);
- improvement, one per round: `Handoff` of a unit to a same-stage neighbour with spare capacity, or `Swap` of
  units with a full one, when it lowers cost, or with probability exp(-delta / T) (simulated annealing, T decays);
  the holder then `Repoint`s the unit's upstream and downstream.
Crashes: a node told that a peer died re-places the units it sent there and drops the units it got from there
(`Release` down the chain). Joins: the newcomer announces itself with `Hello`; nothing else changes.

Local knowledge: candidate sets are bounded (`AgentConfig.neighbours` per stage, chosen by link cost with random
ties), so messages per node per round do not grow with the swarm. Costs of links between two other peers are
estimated from their regions (what a DHT record says), the node's own links from the link model.

Trust: every message is validated (sender is a known peer of the right stage, numbers finite, lists bounded,
units known). A node enforces its own capacity on everything it accepts, so a peer lying about its capacity or
cost can attract units to itself but cannot make any other node hold more than its capacity.
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
UnitId = tuple[str, int]  # (origin data node, microbatch index)


# ------------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Advert:
    sender: str
    stage: int
    spare: int
    compute_s: float
    cost: tuple[tuple[str, float], ...]  # (sink region, cost-to-sink including the sender's compute)


@dataclass(frozen=True)
class Hello:
    sender: str
    stage: int


@dataclass(frozen=True)
class Request:
    sender: str
    units: tuple[tuple[UnitId, str], ...]  # (unit, origin region)


@dataclass(frozen=True)
class Reply:
    sender: str
    accepted: tuple[UnitId, ...]
    rejected: tuple[UnitId, ...]
    spare: int


@dataclass(frozen=True)
class Lost:
    """Downstream gives units back: it could not place them further."""

    sender: str
    units: tuple[UnitId, ...]


@dataclass(frozen=True)
class Release:
    """Upstream no longer sends these units here: free their slots (and pass the release on)."""

    sender: str
    units: tuple[UnitId, ...]


@dataclass(frozen=True)
class Handoff:
    sender: str
    unit: UnitId
    origin_region: str
    up: str
    down: str


@dataclass(frozen=True)
class Swap:
    sender: str
    unit: UnitId
    origin_region: str
    up: str
    down: str
    temperature: float


@dataclass(frozen=True)
class HandoffReply:
    sender: str
    unit: UnitId
    accepted: bool
    # for a swap: the unit the replier gives back, as (unit, origin region, up, down)
    back: tuple[UnitId, str, str, str] | None = None


@dataclass(frozen=True)
class Repoint:
    """The unit moved from `previous` to `new_holder` (sent by the one that accepted the move, so every pointer
    changes in the same round the holders do)."""

    sender: str
    unit: UnitId
    previous: str
    new_holder: str


Message = Advert | Hello | Request | Reply | Lost | Release | Handoff | Swap | HandoffReply | Repoint


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
    patience: int = 3  # rounds a unit may stay unplaced before it goes back upstream
    park_rounds: int = 10  # a data node re-offers a unit that came back this many rounds later
    temperature0: float = 0.02  # seconds; annealing temperature of round 0
    cooling: float = 0.7
    improve_after: int = 2  # rounds before improvement moves start

    def __post_init__(self) -> None:
        if self.neighbours < 1 or self.lookup < 1 or self.patience < 1 or not 0 < self.cooling < 1:
            raise ValueError("AgentConfig: neighbours, lookup, patience >= 1 and 0 < cooling < 1")


@dataclass
class Slot:
    origin_region: str
    up: str
    down: str | None = None
    asked: str | None = None  # request in flight to this peer
    waited: int = 0
    parked_until: int = -1


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
        self.units: dict[UnitId, Slot] = {}
        self.next: dict[str, NeighbourState] = {}
        self.same: dict[str, NeighbourState] = {}
        self.subscribers: set[str] = set()  # upstream peers that keep me as a candidate
        self.known: dict[str, PeerCard] = {}
        self.my_cost: dict[str, float] = {}
        self.last_advert: tuple | None = None
        self.pending_move: UnitId | None = None
        self.rejected = 0  # invalid messages dropped

    # ------------------------------------------------------------------------------------------ bookkeeping

    @property
    def me(self) -> str:
        return self.card.peer_id

    @property
    def is_data(self) -> bool:
        return self.card.stage == 0

    @property
    def spare(self) -> int:
        return INF if self.is_data else self.card.capacity - len(self.units)  # type: ignore[return-value]

    def learn(self, card: PeerCard) -> None:
        self.known[card.peer_id] = card

    def add_next(self, card: PeerCard) -> None:
        self.learn(card)
        if card.peer_id not in self.next:
            self.next[card.peer_id] = NeighbourState(card, card.capacity)
            self.bus.send(card.peer_id, Hello(self.me, self.card.stage))

    def add_same(self, card: PeerCard) -> None:
        self.learn(card)
        if card.peer_id != self.me and card.peer_id not in self.same:
            self.same[card.peer_id] = NeighbourState(card, card.capacity)

    def add_units(self, count: int) -> None:
        """A data node's microbatches for this iteration."""
        start = len(self.units)
        for k in range(start, start + count):
            self.units[(self.me, k)] = Slot(str(self.card.region), up=self.me)

    # --------------------------------------------------------------------------------------------- a round

    def step(self, round_no: int, inbox: list[Message], directory) -> None:
        for msg in inbox:
            try:
                self._handle(msg)
            except BadMessage as exc:
                self.rejected += 1
                logger.debug("%s dropped %s: %s", self.me, type(msg).__name__, exc)
        self._advertise()
        self._place(round_no, directory)
        if self._my_turn(round_no) and self.pending_move is None:
            self._improve(self.cfg.temperature0 * self.cfg.cooling ** (round_no - self.cfg.improve_after))

    def _my_turn(self, round_no: int) -> bool:
        """A move takes two rounds to land; adjacent stages take turns (period 4) so that no unit is moved at
        two consecutive stages at once, which would leave the pointers of one move stale."""
        since = round_no - self.cfg.improve_after
        return not self.is_data and since >= 0 and since % 4 == 2 * (self.card.stage % 2)

    def peer_died(self, peer: str) -> None:
        """Local renegotiation: units sent to `peer` are re-placed, units received from it are released."""
        self.next.pop(peer, None)
        self.same.pop(peer, None)
        self.subscribers.discard(peer)
        released: dict[str, list[UnitId]] = defaultdict(list)
        for uid, slot in list(self.units.items()):
            if slot.down == peer or slot.asked == peer:
                slot.down = slot.asked = None
            if slot.up == peer and not self.is_data:
                del self.units[uid]
                if slot.down is not None:
                    released[slot.down].append(uid)
                elif slot.asked is not None:
                    released[slot.asked].append(uid)
        for dst, uids in released.items():
            self.bus.send(dst, Release(self.me, tuple(uids)))

    # -------------------------------------------------------------------------------------------- handlers

    def _handle(self, msg: Message) -> None:
        card = self.known.get(msg.sender)
        if card is None and not isinstance(msg, Hello):
            raise BadMessage(f"unknown sender {msg.sender}")
        handler = getattr(self, f"_on_{type(msg).__name__.lower()}")
        handler(msg, card)

    def _expect_stage(self, card: PeerCard | None, stage: int) -> PeerCard:
        if card is None or card.stage != stage:
            raise BadMessage(f"sender is not a stage-{stage} peer")
        return card

    def _on_hello(self, msg: Hello, card) -> None:
        card = self.known.get(msg.sender)
        if card is None or card.stage != msg.stage:
            raise BadMessage("hello from a peer without a matching record")
        if card.stage == self.card.stage - 1:
            self.subscribers.add(card.peer_id)
            self.last_advert = None  # the newcomer needs our figures
        elif card.stage == self.card.stage and len(self.same) < 2 * self.cfg.neighbours:
            self.add_same(card)
        elif card.stage == self.card.stage + 1 and len(self.next) < 2 * self.cfg.neighbours:
            self.add_next(card)  # a newcomer next door: a candidate for our units

    def _on_advert(self, msg: Advert, card) -> None:
        if not (math.isfinite(msg.compute_s) and msg.compute_s >= 0 and len(msg.cost) <= len(self.sink_regions)):
            raise BadMessage("malformed advert")
        if any(not c >= 0 for _, c in msg.cost):
            raise BadMessage("negative or NaN cost")
        spare = max(0, min(msg.spare, card.capacity))  # never believe more than the record's capacity
        if card.stage == self.card.stage + 1 and msg.sender in self.next:
            state = self.next[msg.sender]
            state.spare, state.cost = spare, dict(msg.cost)
        elif card.stage == self.card.stage and msg.sender in self.same:
            self.same[msg.sender].spare = spare
        # adverts from peers we did not choose are ignored: bounded state

    def _on_request(self, msg: Request, card) -> None:
        self._expect_stage(card, self.card.stage - 1)
        if len(msg.units) > max(self.card.capacity, 1):
            raise BadMessage(f"request for {len(msg.units)} units, more than our recorded capacity")
        accepted, rejected = [], []
        for uid, region in msg.units:
            if not (isinstance(region, str) and region in self.sink_regions):
                rejected.append(uid)
            elif uid in self.units:
                if self.units[uid].up == msg.sender:
                    accepted.append(uid)  # a repeated request: already ours
                else:
                    rejected.append(uid)
            elif self.spare > 0:
                self.units[uid] = Slot(region, up=msg.sender)
                accepted.append(uid)
            else:
                rejected.append(uid)
        self.bus.send(msg.sender, Reply(self.me, tuple(accepted), tuple(rejected), max(self.spare, 0)))

    def _on_reply(self, msg: Reply, card) -> None:
        self._expect_stage(card, self.card.stage + 1)
        for uid in msg.accepted:
            slot = self.units.get(uid)
            if slot is not None and slot.asked == msg.sender:
                slot.down, slot.asked = msg.sender, None
            elif slot is None or slot.down != msg.sender:  # we no longer want it there
                self.bus.send(msg.sender, Release(self.me, (uid,)))
        for uid in msg.rejected:
            slot = self.units.get(uid)
            if slot is not None and slot.asked == msg.sender:
                slot.asked = None
        if msg.sender in self.next:
            self.next[msg.sender].spare = max(0, min(msg.spare, card.capacity))

    def _on_lost(self, msg: Lost, card) -> None:
        self._expect_stage(card, self.card.stage + 1)
        for uid in msg.units:
            slot = self.units.get(uid)
            if slot is not None and slot.down == msg.sender:
                slot.down = None
                if msg.sender in self.next:
                    self.next[msg.sender].spare = 0

    def _on_release(self, msg: Release, card) -> None:
        self._expect_stage(card, self.card.stage - 1)
        onward: dict[str, list[UnitId]] = defaultdict(list)
        for uid in msg.units:
            slot = self.units.get(uid)
            if slot is not None and slot.up == msg.sender:
                del self.units[uid]
                nxt = slot.down or slot.asked
                if nxt is not None and self.card.stage < self.n_stages:
                    onward[nxt].append(uid)
        for dst, uids in onward.items():
            self.bus.send(dst, Release(self.me, tuple(uids)))

    def _on_handoff(self, msg: Handoff, card) -> None:
        self._expect_stage(card, self.card.stage)
        ok = self.spare > 0 and msg.unit not in self.units and msg.origin_region in self.sink_regions
        ok = ok and self._knows(msg.up, msg.down)
        if ok:
            self.units[msg.unit] = Slot(msg.origin_region, up=msg.up, down=msg.down)
            self._repoint(msg.unit, self.units[msg.unit], msg.sender, self.me)
        self.bus.send(msg.sender, HandoffReply(self.me, msg.unit, ok))

    def _on_swap(self, msg: Swap, card) -> None:
        self._expect_stage(card, self.card.stage)
        if msg.unit in self.units or msg.origin_region not in self.sink_regions or not self._knows(msg.up, msg.down):
            self.bus.send(msg.sender, HandoffReply(self.me, msg.unit, False))
            return
        theirs = (msg.sender, msg.up, msg.down, msg.origin_region)
        best: tuple[float, UnitId] | None = None
        for uid, slot in self.units.items():
            if slot.down is None or slot.asked is not None:
                continue
            delta = self._swap_delta(theirs, (self.me, slot.up, slot.down, slot.origin_region))
            if best is None or delta < best[0]:
                best = (delta, uid)
        if best is None or not self._accept(best[0], msg.temperature):
            self.bus.send(msg.sender, HandoffReply(self.me, msg.unit, False))
            return
        uid = best[1]
        given = self.units.pop(uid)
        self.units[msg.unit] = Slot(msg.origin_region, up=msg.up, down=msg.down)
        self._repoint(uid, given, self.me, msg.sender)
        self._repoint(msg.unit, self.units[msg.unit], msg.sender, self.me)
        back = (uid, given.origin_region, given.up, given.down)
        self.bus.send(msg.sender, HandoffReply(self.me, msg.unit, True, back))  # type: ignore[arg-type]

    def _on_handoffreply(self, msg: HandoffReply, card) -> None:
        self._expect_stage(card, self.card.stage)
        if self.pending_move != msg.unit:
            raise BadMessage("reply to a move we did not propose")
        self.pending_move = None
        if not msg.accepted:
            return
        if self.units.pop(msg.unit, None) is None:
            return
        if msg.back is not None:
            uid, region, up, down = msg.back
            if region in self.sink_regions and self._knows(up, down) and uid not in self.units:
                self.units[uid] = Slot(region, up=up, down=down)

    def _on_repoint(self, msg: Repoint, card) -> None:
        slot = self.units.get(msg.unit)
        new = self.known.get(msg.new_holder)
        if slot is None or new is None or new.stage != card.stage or msg.sender not in (msg.previous, msg.new_holder):
            raise BadMessage("repoint of a unit we do not hold, or to a peer of another stage")
        if slot.down == msg.previous:
            slot.down = msg.new_holder
            if msg.new_holder not in self.next and len(self.next) < 2 * self.cfg.neighbours:
                self.add_next(new)
        elif slot.up == msg.previous:
            slot.up = msg.new_holder
        else:
            raise BadMessage("repoint from a peer that does not hold the unit")

    # ------------------------------------------------------------------------------------------- decisions

    def _advertise(self) -> None:
        if self.is_data:
            return
        cost = self._cost_to_sink()
        self.my_cost = cost
        advert_key = (max(self.spare, 0), tuple(sorted((g, round(c, 6)) for g, c in cost.items())))
        if advert_key == self.last_advert:
            return
        self.last_advert = advert_key
        msg = Advert(self.me, self.card.stage, advert_key[0], self.card.compute_s, advert_key[1])
        for peer in sorted(self.subscribers | set(self.same)):
            self.bus.send(peer, msg)

    def _cost_to_sink(self) -> dict[str, float]:
        c = self.card.compute_s
        if self.card.stage == self.n_stages:
            return {g: c + self.costs.link(self.me, rep) for g, rep in self.sink_regions.items()}
        used = {s.down for s in self.units.values()}
        out: dict[str, float] = {}
        for g in self.sink_regions:
            best = INF
            for peer, state in self.next.items():
                if state.spare > 0 or peer in used:
                    best = min(best, self.costs.link(self.me, peer) + state.cost.get(g, INF))
            out[g] = c + best
        return out

    def _estimate(self, peer: str, region: str) -> float:
        state = self.next[peer]
        if region in state.cost:
            return self.costs.link(self.me, peer) + state.cost[region]
        # not advertised yet: assume the rest of the path stays in that peer's region, then returns
        rest = (self.n_stages - state.card.stage) * state.card.compute_s
        return self.costs.link(self.me, peer) + state.card.compute_s + rest + self._region_link(peer, region)

    def _region_link(self, peer: str, region: str) -> float:
        return self.costs.link(peer, self.sink_regions[region])

    def _place(self, round_no: int, directory) -> None:
        if self.card.stage == self.n_stages:
            for uid, slot in self.units.items():
                slot.down = uid[0]  # the last stage returns every microbatch to its own data node
            return
        todo = [(uid, s) for uid, s in self.units.items() if s.down is None and s.asked is None]
        if not todo:
            return
        believed = {p: st.spare for p, st in self.next.items()}
        batches: dict[str, list[tuple[UnitId, str]]] = defaultdict(list)
        back: dict[str, list[UnitId]] = defaultdict(list)
        for uid, slot in sorted(todo):
            if slot.parked_until > round_no:
                continue
            choice = self._choose(slot.origin_region, believed)
            if choice is None:
                self._refresh(directory)
                choice = self._choose(slot.origin_region, believed)
            if choice is None:
                self._stuck(uid, slot, round_no, back)
                continue
            believed[choice] -= 1
            slot.asked, slot.waited = choice, 0
            batches[choice].append((uid, slot.origin_region))
        for dst, units in batches.items():
            self.bus.send(dst, Request(self.me, tuple(units)))
        for dst, uids in back.items():
            self.bus.send(dst, Lost(self.me, tuple(uids)))

    def _choose(self, region: str, believed: dict[str, int]) -> str | None:
        # a little noise spreads the requests of many upstream peers over near-equal candidates (fewer rejections)
        options = [
            (self._estimate(p, region) * (1 + 0.1 * self.rng.random()), p) for p, spare in believed.items() if spare > 0
        ]
        return min(options)[1] if options else None

    def _stuck(self, uid: UnitId, slot: Slot, round_no: int, back: dict[str, list[UnitId]]) -> None:
        slot.waited += 1
        if slot.waited < self.cfg.patience:
            return
        if self.is_data:
            slot.parked_until, slot.waited = round_no + self.cfg.park_rounds, 0
        else:
            del self.units[uid]
            back[slot.up].append(uid)

    def _refresh(self, directory) -> None:
        """Ask the DHT directory for next-stage peers with spare capacity (bounded), cheapest links first."""
        for card in directory.lookup(self.card.stage + 1, self.me, self.cfg.lookup, self.rng):
            if card.peer_id not in self.next:
                self._evict_idle_next()
                self.add_next(card)

    def _evict_idle_next(self) -> None:
        if len(self.next) < 2 * self.cfg.neighbours:
            return
        used = {s.down for s in self.units.values()} | {s.asked for s in self.units.values()}
        idle = [p for p, st in self.next.items() if p not in used and st.spare == 0]
        if idle:
            del self.next[self.rng.choice(sorted(idle))]

    # ------------------------------------------------------------------------------------------ improvement

    def _improve(self, temperature: float) -> None:
        placed = sorted(uid for uid, s in self.units.items() if s.down is not None and s.asked is None)
        if not placed or not self.same:
            return
        uid = self.rng.choice(placed)
        slot = self.units[uid]
        if not self._knows(slot.up, slot.down):
            return
        here = self._local(self.me, slot.up, slot.down)  # type: ignore[arg-type]
        spare = [p for p, st in sorted(self.same.items()) if st.spare > 0]
        if spare:
            best = min(spare, key=lambda p: self._local(p, slot.up, slot.down))  # type: ignore[arg-type]
            delta = self._local(best, slot.up, slot.down) - here  # type: ignore[arg-type]
            if self._accept(delta, temperature):
                self.pending_move = uid
                self.same[best].spare -= 1
                self.bus.send(best, Handoff(self.me, uid, slot.origin_region, slot.up, slot.down))  # type: ignore[arg-type]
                return
        partner = self.rng.choice(sorted(self.same))
        self.pending_move = uid
        self.bus.send(partner, Swap(self.me, uid, slot.origin_region, slot.up, slot.down, temperature))  # type: ignore[arg-type]

    def _accept(self, delta: float, temperature: float) -> bool:
        if delta < -1e-9:
            return True
        if temperature <= 1e-6 or delta <= 1e-9:
            return False
        return self.rng.random() < math.exp(-delta / temperature)

    def _local(self, holder: str, up: str, down: str) -> float:
        card = self.known[holder]
        return self.costs.link(up, holder) + card.compute_s + self.costs.link(holder, down)

    def _swap_delta(self, a: tuple[str, str, str, str], b: tuple[str, str, str, str]) -> float:
        """Cost change when units a (held by a[0]) and b (held by b[0]) trade holders."""
        before = self._local(a[0], a[1], a[2]) + self._local(b[0], b[1], b[2])
        after = self._local(b[0], a[1], a[2]) + self._local(a[0], b[1], b[2])
        return after - before

    def _knows(self, *peers: str | None) -> bool:
        return all(p is not None and p in self.known for p in peers)

    def _repoint(self, uid: UnitId, slot: Slot, previous: str, new_holder: str) -> None:
        self.bus.send(slot.up, Repoint(self.me, uid, previous, new_holder))
        # the data node tracks only its first hop, not who holds the last stage
        if slot.down is not None and self.card.stage < self.n_stages:
            self.bus.send(slot.down, Repoint(self.me, uid, previous, new_holder))
