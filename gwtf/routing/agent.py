"""The decentralized GWTF agent: one per node, local knowledge only, messages through a bus.

A *slot* is one microbatch of room on a link: relay i holds slot n at next-stage relay j once j granted it. Each
microbatch is one chain of slots from its data node through one relay per stage, back to the data node. A slot
carries the microbatch's *label* (its origin region: where it must return) and its *prefix* (path cost so far).

Each round a node:
- advertises its cost-to-sink per sink region (distance-vector: its compute plus the cheapest link + advertised
  cost over next-stage peers believed to have room; with none, over all of them plus `blocked_penalty`, a last
  resort rather than "unreachable", so room freed by a crash is used before the news has climbed back up) and
  its room, to the upstream peers that keep it as a candidate, when that changed or after it rejected someone;
- grants requested slots within its capacity, the shortest prefixes first: a microbatch that has come a long
  way has usually been turned down and wandered; measured, serving the direct ones first gives cheaper paths,
  the worst included, and no slower convergence (the min-max repair is the swap below);
- routes every microbatch it holds that has no next hop yet to a next-stage peer with room, the cheapest by
  link + advert or, at random, one nearly as cheap (weight exp(-extra / spread)): senders that all see the same
  cheapest peer would otherwise all ask it and all but a few be rejected, a round trip each; after each
  rejection the circle doubles and the DHT directory is asked afresh for peers with room. Requests are
  batched per peer; a microbatch advances one stage per round. Each request carries the share of its data
  node's demand that had a path when it set out, and contested room goes to the least served first (max-min
  fairness between data nodes: without it, the data nodes of a crowded region were starved, at N = 10,000
  some with no path at all). A request a full relay cannot grant is deflected to same-stage peers with room (from
  the directory, spread over them), which answer the requester directly: a turned-down microbatch moves on one
  round later instead of two (at N = 1000 the last microbatches are turned down at stage after stage, and each
  round trip delayed the fill). A microbatch that finds no peer with room for `patience` rounds is revoked
  (`Lost`) and its sender routes it elsewhere; a data node served at least `fair_share` holds back
  microbatches while its paths look blocked (they would only hold room that others need);
- reports upstream, per slot, what the chain behind it costs per sink region (`ChainCost`: costs travel up the
  chains as labels and prefixes travel down), so every node knows the exact cost of each path it carries;
- improves: two microbatches at the same relay swap their continuations when that lowers the costlier of the
  two paths (the min-max objective); a worse swap is taken with probability exp(-delta / T), T decaying
  (simulated annealing). Optionally (`moves` > 0) a microbatch also moves to a cheaper next hop with room: the
  new chain is built beside the old one and taken once complete and still cheaper. Off by default: measured,
  the chains being built hold room at tight stages that first-time microbatches need, and throughput
  converged later for no better cost. Optionally (`exchange`) two same-stage relays swap next hops: a relay offers
  its costliest microbatch to the next-stage peer that would carry it more cheaply, which matches it with the
  microbatch it carries that would do best at the offerer's next hop; the four slots are re-keyed in one round
  (see `Agent._offer`). Optionally (`takeover`) a relay hands a costly microbatch over to a same-stage peer
  with room that carries it more cheaply between the same hops, re-keyed the same way (`Agent._hand_over`).
  Both off by default: measured, each helps some of the benchmark's figures and hurts others (AgentConfig).
Crashes: a node told that a peer died re-routes the microbatches it sent there and releases the chains of those
that came from it (a `Release` travels down the chain). Joins: `Hello`.

Local knowledge: candidate sets are bounded (`AgentConfig.neighbours` per stage, cheapest links first, topped
up from the DHT directory now and then), so messages per node per round do not grow with the swarm. Trust:
every message is validated (sender is a known peer of the right stage, numbers finite and bounded, lists
bounded, slots known). A relay never grants more slots than its own capacity and never believes more room than
a peer's record states, so a peer lying about its capacity or cost can attract microbatches but cannot make
another node hold more than its capacity. A grant from a peer that was not asked (a deflected request) is taken
only for a request still pending, and the granting peer counted the slot against its own capacity.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Protocol

from gwtf.errors import BadMessage

logger = logging.getLogger(__name__)

INF = float("inf")
SlotKey = tuple[str, int]  # (upstream peer, its slot number)
MAX_BATCH = 64  # slots per message: bounded lists
MAX_COST = 1e6  # seconds: larger costs or prefixes are malformed
EXPIRY_ROUNDS = 3  # a request is answered in 2 rounds (request, reply)

# ------------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Advert:
    sender: str
    stage: int
    spare: int  # room: slots it can still grant
    compute_s: float
    cost: tuple[tuple[str, float], ...]  # (sink region, cost-to-sink including the sender's compute)


@dataclass(frozen=True)
class Hello:
    sender: str
    stage: int


@dataclass(frozen=True)
class Request:
    """Grant me these slots, or: the slots I hold now carry this (label, prefix)."""

    sender: str
    # (slot, origin region, path cost up to the receiver, share of its data node's demand that had a path when
    # it was sent: contested room goes to the least served data nodes first)
    slots: tuple[tuple[int, str, float, float], ...]


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


@dataclass(frozen=True)
class ChainCost:
    """What the chain behind each slot costs per sink region, the sender's compute included; () = broken."""

    sender: str
    slots: tuple[tuple[int, tuple[tuple[str, float], ...]], ...]


@dataclass(frozen=True)
class Route:
    """Sent with `AgentConfig.routes` only: which relays the chain behind each slot goes through, the sender first
    (() = broken). A live swarm's data node needs its paths relay by relay; in the simulator the run reads them off
    the agents (ProtocolRun._trace), so it does not send these."""

    sender: str
    slots: tuple[tuple[int, tuple[str, ...]], ...]


@dataclass(frozen=True)
class Claim:
    """A stage-1 relay to a data node (`AgentConfig.evict`): give slot `slot` here up to a data node with none."""

    sender: str
    slot: int


@dataclass(frozen=True)
class Yield:
    """The data node's answer: slot `slot` is yours to give on (it routes that microbatch again)."""

    sender: str
    slot: int


@dataclass(frozen=True)
class Deflect:
    """A full relay passes on requests it cannot grant to a same-stage peer with room, which answers the
    requester directly (a Reply from a peer it did not ask): a turned-down microbatch moves on a round later
    instead of two (reply, then a new request)."""

    sender: str
    origin: str  # the requester
    slots: tuple[tuple[int, str, float, float], ...]  # as in Request


@dataclass(frozen=True)
class Offer:
    """Cross-relay exchange, step 1 (i -> j*): my microbatch on slot `slot` at `peer` (j) would continue more
    cheaply at you; find one of your upstream peers whose microbatch would do better at j, and they swap."""

    sender: str
    slot: int  # i's out-slot at `peer`
    peer: str  # j
    label: str
    prefix: float  # the microbatch's path cost through i's compute
    chain: tuple[tuple[str, float], ...]  # what j's chain behind the slot costs per sink region
    number: int  # the slot number i will hold at j* once the exchange is done; also the Permit's token


@dataclass(frozen=True)
class Permit:
    """Step 1 (i -> j): a same-stage peer presenting `token` may take my slot `slot` over (see Transfer)."""

    sender: str
    slot: int
    token: int


@dataclass(frozen=True)
class Match:
    """Step 2 (j* -> i'): exchange your slot `theirs` at me with this offer."""

    sender: str
    theirs: int
    offer: Offer


@dataclass(frozen=True)
class Transfer:
    """Step 3 (i' -> j* and i' -> j): slot (`owner`, `slot`) is now (`new_owner`, `number`), carrying (label,
    prefix). A holder takes it from the slot's owner, or from another peer with the owner's Permit token."""

    sender: str
    owner: str
    slot: int
    new_owner: str
    number: int
    label: str
    prefix: float
    token: int = -1


@dataclass(frozen=True)
class Declined:
    """To i: j* found no partner for its offer, or the partner i' turned it down; i may offer again."""

    sender: str
    slot: int


@dataclass(frozen=True)
class Handover:
    """Takeover, step 1 (i -> k, a same-stage peer with room): carry my microbatch from `up`'s slot `slot` on to
    `peer` (j) instead of me; `cost` is what it costs from `up` on through me."""

    sender: str
    up: str
    slot: int
    label: str
    prefix: float  # path cost up to and including `up`'s compute
    share: float
    cost: float
    peer: str  # "" when I am the last stage (the microbatch goes home from here)
    chain: tuple[tuple[str, float], ...]  # what j's chain behind `out` costs per sink region


@dataclass(frozen=True)
class Taken:
    """Step 2 (k -> i): I reserved the slot; hand me your slot at j as my slot `number` (prefix: up to j)."""

    sender: str
    up: str
    slot: int
    number: int
    prefix: float


@dataclass(frozen=True)
class Handback:
    """k -> i: no room or no gain (i may hand the microbatch over again later); i -> k: the microbatch left
    meanwhile, drop the reserved slot."""

    sender: str
    up: str
    slot: int


@dataclass(frozen=True)
class Moved:
    """Step 3 (i -> up): your slot `slot` continues at `peer` from next round (the holders re-key this round)."""

    sender: str
    slot: int
    peer: str


@dataclass(frozen=True)
class Swapped:
    """Step 3 (i' -> i): done; next round your microbatch continues at j* on your slot `Offer.number`."""

    sender: str
    slot: int  # i's slot at j, the offer's
    chain: tuple[tuple[str, float], ...]  # what j*'s chain behind that slot costs per sink region


Message = (
    Advert
    | Hello
    | Request
    | Reply
    | Lost
    | Release
    | ChainCost
    | Route
    | Claim
    | Yield
    | Deflect
    | Offer
    | Match
    | Swapped
    | Permit
    | Transfer
    | Declined
    | Handover
    | Taken
    | Handback
    | Moved
)


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
    neighbours: int = 8  # candidates kept per adjacent stage
    lookup: int = 8  # fresh candidates per directory lookup
    refresh_every: int = 1  # rounds between directory lookups of one node
    patience: int = 3  # rounds a microbatch may wait for a next hop before it is revoked
    moves: int = 0  # cheaper next hops tried per round
    build_rounds: int = 12  # rounds a move's new chain may take to complete
    build_beside: bool = True  # a move keeps the old chain until the new one is complete
    temperature0: float = 0.01  # seconds; annealing temperature of round 0
    cooling: float = 0.5
    margin: float = 0.01  # seconds: smaller gains are not worth a move
    # Rounds a swapped microbatch waits before it swaps again: the costs it swapped on take a few rounds to
    # settle along the chains, and without a pause two relays can swap back and forth on each other's news.
    swap_cooldown: int = 10
    # Seconds added to the advert of a node whose next peers all look full: far above any real path cost, so a
    # blocked-looking path is chosen only when there is no other, and a data node can tell one by its price.
    blocked_penalty: float = 1e4
    spread: float = 0.05  # seconds: peers near the cheapest share new microbatches at random, weight exp(-d/spread)
    fair_share: float = 0.5  # served less than this share of its demand, a data node tries blocked paths too
    deflect: bool = True  # requests a full relay cannot grant go to a same-stage peer with room (see Deflect)
    settle: int = 0  # rounds a data node lets the cost adverts settle before it sends its first microbatch
    # Cross-relay exchanges (Offer, Permit, Match, Transfer, Swapped; see Agent._offer). Off by default: measured
    # in benchmarks.flow (40 rounds, N = 1000, 2 seeds), they cut iteration time (0.530 -> 0.514 of SWARM's) but
    # leave the worst path higher at round 40 (1.78 -> 1.96; lower only after 45 or more rounds), and at N = 100
    # (6 seeds) both are worse (worst path 1.165 -> 1.247, iteration time 0.633 -> 0.641).
    exchange: bool = False
    # A relay hands a costly microbatch over to a same-stage peer with room that carries it more cheaply between
    # the same upstream and downstream hops (design.md: "a node with spare capacity takes over another's flow";
    # see Agent._hand_over). Off by default: measured in benchmarks.flow (40 rounds), at N = 100 (6 seeds) it
    # lowers the worst path (1.165 -> 1.132) and total cost (1.196 -> 1.145) at the same iteration time; at
    # N = 1000 (2 seeds) it lowers total cost (1.142 -> 1.125) and iteration time (0.530 -> 0.513 of SWARM's) but
    # the room it takes slows the fill: worst path 1.78 -> 1.99 at round 40, throughput 0.996 of the optimum,
    # and 0.92 instead of 0.96 reached 20 rounds after a 20 % crash.
    takeover: bool = False
    exchange_cooldown: int = 10  # rounds a microbatch waits after a swap or an offer before it is offered again
    routes: bool = False  # report the relays of each chain upstream (`Route`): on in a live swarm (gwtf.routing.p2p)
    evict: bool = False  # a data node with no first hop may claim one from a data node with two (Agent._claim_for)

    def __post_init__(self) -> None:
        if min(self.neighbours, self.lookup, self.refresh_every, self.patience, self.build_rounds) < 1:
            raise ValueError("AgentConfig: neighbours, lookup, refresh_every, patience, build_rounds must be >= 1")
        if self.moves < 0 or not 0 < self.cooling < 1 or self.margin < 0:
            raise ValueError("AgentConfig: moves >= 0, 0 < cooling < 1, margin >= 0")
        if self.swap_cooldown < 0 or self.settle < 0 or not (self.blocked_penalty > 0 and self.spread > 0):
            raise ValueError("AgentConfig: swap_cooldown, settle >= 0; blocked_penalty, spread > 0")
        if not 0 <= self.fair_share <= 1:
            raise ValueError("AgentConfig: 0 <= fair_share <= 1")


@dataclass
class InSlot:
    """A microbatch this node carries (a data node: one of its own)."""

    label: str  # origin region: where it returns
    prefix: float  # path cost from the origin through this node's compute
    share: float = 0.0  # share of its data node's demand that had a path when it set out
    out: int | None = None  # the out-slot it continues on
    waited: int = 0
    sent_cost: tuple | None = None  # the chain cost the upstream holder knows
    sent_route: tuple[str, ...] | None = None  # the chain's relays the upstream holder knows (AgentConfig.routes)
    swapped: int = -(10**9)  # round of its last swap
    offered: int = -(10**9)  # round it was last offered for a cross-relay exchange or handed over
    quiet_until: int = 0  # taken over: no chain costs upstream until the upstream has switched to us
    rejected: int = 0  # requests for it that were turned down


@dataclass
class OutSlot:
    peer: str
    paired: SlotKey  # the in-slot it continues
    asked: int  # round it was requested
    held: bool = False  # granted by peer
    move: bool = False  # a cheaper chain being built beside the in-slot's current one
    chain: dict[str, float] = field(default_factory=dict)  # cost of the chain behind it (empty: not complete)
    route: tuple[str, ...] = ()  # the relays of that chain, the peer first (AgentConfig.routes; (): not known)
    sent: tuple[str, float] | None = None  # the (label, prefix) the peer knows
    quiet_until: int = 0  # an exchanged slot: no updates until the holder has re-keyed it (see Transfer)


@dataclass
class NeighbourState:
    card: PeerCard
    spare: int
    hop: float  # the link term to it (measured figures do not change within a plan)
    heard: bool = False  # an advert arrived: `cost` is what it says (a missing region: unreachable)
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
        self.inbound: dict[SlotKey, InSlot] = {}  # a data node: its own units, keyed (itself, unit)
        self.outbound: dict[int, OutSlot] = {}
        self.next_no = 0
        self.next: dict[str, NeighbourState] = {}
        self.subscribers: set[str] = set()  # upstream peers that keep me as a candidate
        self.known: dict[str, PeerCard] = {}
        self.my_cost: dict[str, float] = {}
        self.last_advert: tuple | None = None
        self.rejected = 0  # invalid messages dropped
        self.round_no = 0
        self.last_refresh = -(10**9)
        self._requests: dict[str, list[tuple[int, str, float, float]]] = defaultdict(list)
        self._asks: list[tuple[str, int, str, float, float]] = []  # new slot requests of this round
        self._via: set[SlotKey] = set()  # of those, the ones another relay deflected here (not deflected again)
        self._directory = None
        self.offers: dict[int, tuple[int, str, int]] = {}  # my out-slot offered -> (number at j*, j*, round)
        self.matched: dict[SlotKey, int] = {}  # in-slots I proposed for an exchange -> round
        self.permits: dict[SlotKey, tuple[int, int]] = {}  # in-slot -> (token, round) its owner may give away
        self.switches: list[tuple[SlotKey, int, int]] = []  # (in-slot, new out-slot, old out-slot): next round
        self.handovers: dict[SlotKey, tuple[str, int]] = {}  # in-slot handed over -> (to whom, round)
        self.adopted: dict[SlotKey, tuple[str, int]] = {}  # in-slot reserved for a handover -> (from whom, round)
        self.leaving: list[tuple[SlotKey, int | None, int]] = []  # handed over: dropped at the given round
        self.takeovers = 0  # microbatches handed over to a same-stage peer
        self.withdrawn: dict[int, tuple[int, str, int]] = {}  # offers withdrawn for a mirror match, as `offers`
        self.exchanges = 0  # exchanges completed on my side
        self.claims: dict[SlotKey, tuple[tuple[str, int, str, float, float], int]] = {}  # see _claim_for
        self.claimed = 0  # slots handed to a data node that had no first hop (see _claim_for)

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
    def spare(self) -> int:
        """Room for more microbatches."""
        if self.is_data:
            return 0
        return max(0, self.card.capacity - len(self.inbound))

    @property
    def load(self) -> int:
        return len(self.inbound)

    def learn(self, card: PeerCard) -> None:
        self.known[card.peer_id] = card

    def add_next(self, card: PeerCard) -> None:
        self.learn(card)
        if card.peer_id not in self.next:
            self.next[card.peer_id] = NeighbourState(card, card.capacity, self.costs.link(self.me, card.peer_id))
            self.bus.send(card.peer_id, Hello(self.me, self.card.stage))

    def meet(self, directory, newcomer: bool) -> None:
        """First candidates from the directory: the nearest next-stage peers; a newcomer also tells the nearest
        previous-stage relays that it is there (they keep it as a candidate)."""
        k = self.cfg.neighbours
        if self.card.stage < self.n_stages:
            for other in directory.nearest(self.card.stage + 1, self.me, k, self.rng, need_spare=False):
                self.add_next(other)
        if newcomer and self.card.stage >= 2:
            for other in directory.nearest(self.card.stage - 1, self.me, k, self.rng, need_spare=False):
                self.bus.send(other.peer_id, Hello(self.me, self.card.stage))

    def add_same(self, card: PeerCard) -> None:
        self.learn(card)

    def add_units(self, count: int) -> None:
        """A data node's microbatches for this iteration."""
        label = str(self.card.region)
        for _ in range(count):
            self.inbound[(self.me, self.next_no)] = InSlot(label, self.card.compute_s)
            self.next_no += 1

    def units(self) -> list[tuple[int, OutSlot]]:
        """A data node's microbatches that have a first hop, the cheapest path first (by the chain costs it was
        told): when an iteration has more microbatches than paths, the extra waves take the first paths."""
        held = [
            (self._value(s.out, s.label), s.out)
            for s in self.inbound.values()
            if s.out is not None and self._held_out(s) is not None
        ]
        return [(n, self.outbound[n]) for _, n in sorted(held)]

    def _held_out(self, slot: InSlot) -> OutSlot | None:
        out = self.outbound.get(slot.out) if slot.out is not None else None
        return out if out is not None and out.held else None

    # --------------------------------------------------------------------------------------------- a round

    def step(self, round_no: int, inbox: list[Message], directory) -> None:
        self.round_no = round_no
        self._directory = directory
        self._switch()
        self._leave()
        # Re-keyings first: a new owner's messages about a transferred slot may arrive with the transfer.
        for msg in sorted(inbox, key=lambda m: not isinstance(m, Transfer)):
            try:
                self._handle(msg)
            except BadMessage as exc:
                self.rejected += 1
                logger.debug("%s dropped %s: %s", self.me, type(msg).__name__, exc)
        self._grant()
        if not self.is_last:
            self._expire()
            self._route(directory)
            self._move()
            self._swap()
        self._offer()
        self._hand_over()
        if not self.is_last:
            self._send_updates()
        self._flush()
        self._report_upstream(ChainCost, "sent_cost", self._cost_of)
        if self.cfg.routes:
            self._report_upstream(Route, "sent_route", self._route_of)
        self._advertise()

    def peer_died(self, peer: str) -> None:
        """Local renegotiation: microbatches sent to `peer` are routed elsewhere; those from it are released."""
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

    def _valid_cost(self, cost) -> dict[str, float]:
        if len(cost) > len(self.sink_regions) or any(not (isinstance(e, tuple) and len(e) == 2) for e in cost):
            raise BadMessage("cost list malformed or longer than the sink regions")
        out = {}
        for g, c in cost:
            if g not in self.sink_regions or not isinstance(c, float | int) or not 0 <= c < MAX_COST:
                raise BadMessage("unknown region, or negative, NaN or huge cost")
            out[g] = float(c)
        return out

    def _on_hello(self, msg: Hello, card: PeerCard) -> None:
        if card.stage != msg.stage:
            raise BadMessage("hello from a peer without a matching record")
        if card.stage == self.card.stage - 1:
            self.subscribers.add(card.peer_id)
            self.last_advert = None  # the newcomer needs our figures
        elif card.stage == self.card.stage + 1 and len(self.next) < 2 * self.cfg.neighbours:
            self.add_next(card)  # a newcomer next door: a candidate for our microbatches

    def _on_advert(self, msg: Advert, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage + 1)
        if not (math.isfinite(msg.compute_s) and msg.compute_s >= 0):
            raise BadMessage("malformed advert")
        cost = self._valid_cost(msg.cost)
        state = self.next.get(msg.sender)
        if state is not None:  # adverts from peers we did not choose are ignored: bounded state
            state.spare = max(0, min(msg.spare, card.capacity))  # never believe more than the record's capacity
            state.cost, state.heard = cost, True

    def _on_request(self, msg: Request, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage - 1)
        if len(msg.slots) > MAX_BATCH or any(not (isinstance(e, tuple) and len(e) == 4) for e in msg.slots):
            raise BadMessage("too many or malformed slot entries")
        fresh = sum(1 for e in msg.slots if (msg.sender, e[0]) not in self.inbound)
        if fresh > max(self.card.capacity, 1):
            raise BadMessage(f"request for {fresh} new slots, more than our recorded capacity")
        rejected = []
        for n, label, prefix, share in msg.slots:
            if not self._valid_ask(n, label, prefix, share):
                rejected.append(n)
                continue
            slot = self.inbound.get((msg.sender, n))
            if slot is not None:  # the microbatch on a slot already granted changed: it travels down the chain
                slot.label, slot.prefix = label, float(prefix) + self.card.compute_s
            else:
                self._asks.append((msg.sender, n, label, float(prefix), float(share)))
        if rejected:
            self.bus.send(msg.sender, Reply(self.me, (), tuple(rejected), self.spare))
            self.last_advert = None

    def _valid_ask(self, n, label, prefix, share) -> bool:
        """One (slot, label, prefix, share) entry of a Request or Deflect: a known sink, finite bounded numbers."""
        if not (isinstance(n, int) and label in self.sink_regions and isinstance(prefix, float | int)):
            return False
        return isinstance(share, float | int) and 0 <= share <= 1 and 0 <= prefix < MAX_COST

    def _grant(self) -> None:
        """Grant new slots within capacity: the least served data nodes first (by tenths of their demand), then
        the shortest prefixes (see the module docstring). What does not fit is deflected to peers with room."""
        self._forget(self.claims)
        if not self._asks:
            return
        accepted: dict[str, list[int]] = defaultdict(list)
        rejected: dict[str, list[int]] = defaultdict(list)
        overflow = []
        claimed: list[SlotKey] = []
        for ask in sorted(self._asks, key=lambda a: (round(a[4], 1), a[3], a[0], a[1])):
            sender, n, label, prefix, share = ask
            if len(self.inbound) < self.card.capacity and (sender, n) not in self.inbound:
                self.inbound[(sender, n)] = InSlot(label, prefix + self.card.compute_s, share=share)
                accepted[sender].append(n)
            elif self._claim_for(ask, claimed):
                continue
            elif (sender, n) not in self.inbound and (sender, n) not in self._via and self.cfg.deflect:
                overflow.append(ask)
            else:
                rejected[sender].append(n)
        self._asks.clear()
        self._via.clear()
        for sender, n in self._deflect(overflow):
            rejected[sender].append(n)
        for sender in sorted(set(accepted) | set(rejected)):
            self.bus.send(sender, Reply(self.me, tuple(accepted[sender]), tuple(rejected[sender]), self.spare))
        if rejected:  # the rejected believe we are full from now on: they hear from us when that changes
            self.last_advert = None

    def _claim_for(self, ask: tuple[str, int, str, float, float], claimed: list) -> bool:
        """Where data nodes meet (stage 1), with `AgentConfig.evict`: a data node with no first hop at all finds
        this relay full. Ask the data node that holds the most slots here to give one up (`Claim`); if it has
        another first hop it yields (`Yield`) and the slot, with the chain behind it, goes to the newcomer. The
        holder decides, from what it holds now, so two relays claiming at once cannot leave it without a first
        hop (no swinging back). One claim per round. Without it a data node that starts after another has taken
        the room waits for good (room is never given back)."""
        sender, n, label, prefix, share = ask
        if not self.cfg.evict or self.card.stage != 1 or share > 0 or claimed:
            return False
        if any(k[0] == sender for k in self.inbound) or any(c[0][0] == sender for c in self.claims.values()):
            return False
        held = Counter(k[0] for k in self.inbound if k not in self.claims)
        if not held:
            return False
        most = max(held.values())  # the data node with the most slots here gives one up (ties: the first)
        victim = min(k for k in self.inbound if k not in self.claims and held[k[0]] == most)
        self.claims[victim] = (ask, self.round_no)
        self.bus.send(victim[0], Claim(self.me, victim[1]))
        claimed.append(victim)
        return True

    def _on_claim(self, msg: Claim, card: PeerCard) -> None:
        """A data node gives a first hop up for another data node that has none, if it keeps one (`_claim_for`)."""
        self._expect_stage(card, self.card.stage + 1)
        out = self.outbound.get(msg.slot)
        if not self.is_data or out is None or out.peer != msg.sender or not out.held:
            return
        if len(self.units()) >= 2:
            self._drop_out(msg.slot)  # the microbatch is routed again; the slot is the relay's to give on
            self.bus.send(msg.sender, Yield(self.me, msg.slot))

    def _on_yield(self, msg: Yield, card: PeerCard) -> None:
        self._expect_stage(card, 0)
        key = (msg.sender, msg.slot)
        claim = self.claims.pop(key, None)
        if key not in self.inbound:
            return
        if claim is None or (claim[0][0], claim[0][1]) in self.inbound:
            self._drop_in(key)  # nobody waits for it (any more): as a Release
            return
        sender, n, label, prefix, share = claim[0]
        self._rekey(key, (sender, n), label, prefix).share = share  # the chain continues the newcomer
        self.bus.send(sender, Reply(self.me, (n,), (), self.spare))
        self.claimed += 1

    def _deflect(self, overflow: list[tuple[str, int, str, float, float]]) -> list[SlotKey]:
        """Pass asks we cannot grant to same-stage peers with room (from the directory, nearest first), a few
        each; returns those left to reject."""
        lookup = getattr(self._directory, "lookup", None)
        peers = lookup(self.card.stage, self.me, self.cfg.lookup, self.rng) if overflow and lookup else []
        room = [c for c in peers if c.peer_id != self.me and c.stage == self.card.stage]
        batches: dict[tuple[str, str], list[tuple[int, str, float, float]]] = defaultdict(list)
        left = []
        for k, (sender, n, label, prefix, share) in enumerate(overflow):
            if not room:
                left.append((sender, n))
                continue
            batches[(room[k % len(room)].peer_id, sender)].append((n, label, prefix, share))
        for (peer, sender), slots in sorted(batches.items()):
            self.bus.send(peer, Deflect(self.me, sender, tuple(slots[:MAX_BATCH])))
        return left

    def _on_deflect(self, msg: Deflect, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage)
        origin = self.known.get(msg.origin) if isinstance(msg.origin, str) else None
        if origin is None or origin.stage != self.card.stage - 1:
            raise BadMessage("deflected request from an unknown or wrong-stage origin")
        if len(msg.slots) > max(self.card.capacity, 1) or any(
            not (isinstance(e, tuple) and len(e) == 4) for e in msg.slots
        ):
            raise BadMessage("too many or malformed deflected slots")
        for n, label, prefix, share in msg.slots:
            if self._valid_ask(n, label, prefix, share) and (msg.origin, n) not in self.inbound:
                self._asks.append((msg.origin, n, label, float(prefix), float(share)))
                self._via.add((msg.origin, n))

    def _on_reply(self, msg: Reply, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage + 1)
        for n in msg.accepted:
            out = self.outbound.get(n)
            if out is not None and out.peer == msg.sender:
                out.held = True
            elif out is not None and not out.held:  # the peer we asked deflected the request to this one
                out.peer, out.held = msg.sender, True
            else:  # we no longer want it there
                self.bus.send(msg.sender, Release(self.me, (n,)))
        for n in msg.rejected:
            out = self.outbound.get(n)
            if out is not None and not out.held:
                slot = self.inbound.get(out.paired)
                if slot is not None and slot.out == n:
                    slot.rejected += 1
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

    def _downstream_entries(self, msg: ChainCost | Route, card: PeerCard, what: str) -> list[tuple[int, tuple]]:
        """A per-slot report from a next-stage peer: (slot, tuple) pairs, bounded."""
        self._expect_stage(card, self.card.stage + 1)
        if len(msg.slots) > MAX_BATCH:
            raise BadMessage(f"{what} list too long")
        for entry in msg.slots:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], tuple)):
                raise BadMessage(f"malformed {what} entry")
        return list(msg.slots)

    def _on_chaincost(self, msg: ChainCost, card: PeerCard) -> None:
        for n, cost in self._downstream_entries(msg, card, "chain cost"):
            chain = self._valid_cost(cost)
            out = self.outbound.get(n)
            if out is not None and out.peer == msg.sender:
                out.chain = chain
            elif out is None and isinstance(n, int):  # a slot we no longer have (e.g. after an exchange): free it
                self.bus.send(msg.sender, Release(self.me, (n,)))

    def _on_route(self, msg: Route, card: PeerCard) -> None:
        for n, route in self._downstream_entries(msg, card, "route"):
            if route and not self._valid_route(route, msg.sender):
                raise BadMessage("a route must list known relays of the next stages in order, the sender first")
            out = self.outbound.get(n)
            if out is not None and out.peer == msg.sender:
                out.route = route

    def _valid_route(self, route: tuple, sender: str) -> bool:
        stages = [self.known[p].stage if isinstance(p, str) and p in self.known else -1 for p in route]
        return route[0] == sender and stages == list(range(self.card.stage + 1, self.n_stages + 1))

    # ------------------------------------------------------------------------------ cross-relay exchange
    # Two same-stage relays swap next hops (design.md's improvement move). Rounds: t, i offers its costliest
    # microbatch A (on slot m at j) to the next-stage peer j* that would carry it more cheaply, and permits j to
    # hand slot m to whoever presents the offer's token; t+1, j* picks the microbatch B it carries (from i') that
    # would do best at j and forwards the offer (Match); t+2, i' checks the exchange with its own figures and, if
    # it lowers the costlier of the two paths, sends both Transfers and tells i (Swapped); t+3, j* and j re-key
    # their slots and i and i' switch, all in one round, so no path is ever half-moved at the end of a round.

    def _valid_offer(self, offer: Offer) -> PeerCard:
        """An Offer's fields: a known offerer one stage before `peer`, a known sink, finite bounded numbers."""
        ok = isinstance(offer, Offer) and isinstance(offer.slot, int) and isinstance(offer.number, int)
        origin = self.known.get(offer.sender) if ok and isinstance(offer.sender, str) else None
        peer = self.known.get(offer.peer) if ok and isinstance(offer.peer, str) else None
        if origin is None or peer is None or peer.stage != origin.stage + 1 or offer.label not in self.sink_regions:
            raise BadMessage("offer from or about an unknown peer, or for an unknown sink")
        if not (isinstance(offer.prefix, float | int) and 0 <= offer.prefix < MAX_COST):
            raise BadMessage("offer prefix negative, NaN or huge")
        return origin

    def _on_offer(self, msg: Offer, card: PeerCard) -> None:
        """j*: find the upstream microbatch here that would do better at the offer's j, and ask its sender."""
        self._expect_stage(card, self.card.stage - 1)
        self._valid_offer(msg)
        if msg.peer == self.me:
            raise BadMessage("offer to exchange with the peer it already continues at")
        chain_j = self._valid_cost(msg.chain)
        label_a, pref_a = msg.label, float(msg.prefix)
        if label_a not in chain_j:
            return
        old_a = pref_a + self.costs.link(msg.sender, msg.peer) + chain_j[label_a]
        best: tuple[float, SlotKey] | None = None
        for key, slot in self.inbound.items():
            if key[0] == msg.sender or self.round_no - self.matched.get(key, -(10**9)) <= EXPIRY_ROUNDS:
                continue
            here = self._chain_of(slot)  # my compute + the rest, per sink region
            if slot.label not in here or label_a not in here or slot.label not in chain_j:
                continue
            before_me = slot.prefix - self.card.compute_s - self.costs.link(key[0], self.me)  # B's prefix at i'
            old = max(old_a, slot.prefix - self.card.compute_s + here[slot.label])
            new = max(
                pref_a + self.costs.link(msg.sender, self.me) + here[label_a],
                before_me + self.costs.link(key[0], msg.peer) + chain_j[slot.label],
            )
            if old - new > self.cfg.margin and (best is None or old - new > best[0]):
                best = (old - new, key)
        if best is None:
            self.bus.send(msg.sender, Declined(self.me, msg.slot))
            return
        key = best[1]
        self.matched[key] = self.round_no
        self.bus.send(key[0], Match(self.me, key[1], msg))

    def _on_permit(self, msg: Permit, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage - 1)
        if not (isinstance(msg.slot, int) and isinstance(msg.token, int)):
            raise BadMessage("malformed permit")
        if (msg.sender, msg.slot) in self.inbound:
            self.permits[(msg.sender, msg.slot)] = (msg.token, self.round_no)

    def _on_match(self, msg: Match, card: PeerCard) -> None:
        """i': check the exchange with my own figures; if it lowers the costlier path, hand my slot at j* to i and
        take i's slot at j (both Transfers), tell i, and switch next round, when both holders have re-keyed."""
        self._expect_stage(card, self.card.stage + 1)
        offer = msg.offer
        origin = self._valid_offer(offer)
        if origin.stage != self.card.stage or offer.sender == self.me or offer.peer == msg.sender:
            raise BadMessage("match for an offer from a peer of another stage, or about the same next hop")
        chain_j = self._valid_cost(offer.chain)
        if not self._take(msg, chain_j):
            self.bus.send(offer.sender, Declined(self.me, offer.slot))

    def _take(self, msg: Match, chain_j: dict[str, float]) -> bool:
        offer = msg.offer
        out = self.outbound.get(msg.theirs) if isinstance(msg.theirs, int) else None
        if out is None or out.peer != msg.sender or not out.held:
            return False
        key = out.paired
        slot = self.inbound.get(key)
        # Two relays that offered each other's next hop at once: the one with the smaller id takes the match and
        # withdraws its own offer (a Swapped that still comes for it is undone), the other declines.
        mirror = msg.theirs in self.offers and self.me < offer.sender
        if mirror:
            self.withdrawn[msg.theirs] = self.offers.pop(msg.theirs)
        if (
            slot is None
            or slot.out != msg.theirs
            or key in self.handovers
            or not self._exchangeable(slot, partner=True)
        ):
            return False
        la, lb = offer.label, slot.label
        if la not in out.chain or lb not in out.chain or la not in chain_j or lb not in chain_j:
            return False
        old = max(offer.prefix + self.costs.link(offer.sender, offer.peer) + chain_j[la], self._total(key))
        prefix_a = round(float(offer.prefix) + self.costs.link(offer.sender, msg.sender), 4)
        prefix_b = round(slot.prefix + self.costs.link(self.me, offer.peer), 4)
        if old - max(prefix_a + out.chain[la], prefix_b + chain_j[lb]) <= self.cfg.margin:
            return False
        mine = self.next_no
        self.next_no += 1
        self.outbound[mine] = OutSlot(
            offer.peer, key, self.round_no, held=True, chain=chain_j, sent=(lb, prefix_b), quiet_until=self.round_no + 3
        )
        self.switches.append((key, mine, msg.theirs))
        slot.swapped, out.quiet_until = self.round_no, self.round_no + 2  # no swap, no update until the switch
        self.bus.send(msg.sender, Transfer(self.me, self.me, msg.theirs, offer.sender, offer.number, la, prefix_a))
        self.bus.send(
            offer.peer, Transfer(self.me, offer.sender, offer.slot, self.me, mine, lb, prefix_b, offer.number)
        )
        self.bus.send(offer.sender, Swapped(self.me, offer.slot, tuple(sorted(out.chain.items()))))
        return True

    def _on_declined(self, msg: Declined, card: PeerCard) -> None:
        if card.stage not in (self.card.stage, self.card.stage + 1) or not isinstance(msg.slot, int):
            raise BadMessage("declined from a peer of an unrelated stage, or malformed")
        self.offers.pop(msg.slot, None)

    def _on_swapped(self, msg: Swapped, card: PeerCard) -> None:
        """i: my offer was taken; my microbatch switches to its slot at j* next round (j* re-keys this round)."""
        self._expect_stage(card, self.card.stage)
        if not isinstance(msg.slot, int):
            raise BadMessage("malformed swapped")
        chain = self._valid_cost(msg.chain)
        pending = self.offers.pop(msg.slot, None)
        if pending is None:
            late = self.withdrawn.pop(msg.slot, None)
            if late is not None:  # j* handed us its slot for an offer we withdrew: give it back
                self.bus.send(late[1], Release(self.me, (late[0],)))
            return  # or not ours: j refuses the partner's Transfer without our permit, and the partner re-routes
        number, jstar, _ = pending
        out = self.outbound.get(msg.slot)
        slot = self.inbound.get(out.paired) if out is not None else None
        if out is None or slot is None or slot.out != msg.slot:  # the microbatch left meanwhile
            self.bus.send(jstar, Release(self.me, (number,)))
            return
        prefix = round(slot.prefix + self._hop(jstar), 4)
        self.outbound[number] = OutSlot(
            jstar,
            out.paired,
            self.round_no,
            held=True,
            chain=chain,
            sent=(slot.label, prefix),
            quiet_until=self.round_no + 2,
        )
        slot.out, slot.swapped = number, self.round_no
        del self.outbound[msg.slot]
        self.exchanges += 1

    def _on_transfer(self, msg: Transfer, card: PeerCard) -> None:
        """A holder re-keys a slot handed to a same-stage peer: told by the slot's owner, or with its permit."""
        self._expect_stage(card, self.card.stage - 1)
        owner = self.known.get(msg.new_owner) if isinstance(msg.new_owner, str) else None
        if owner is None or owner.stage != card.stage or msg.new_owner == msg.owner or not isinstance(msg.number, int):
            raise BadMessage("transfer to an unknown or wrong-stage owner")
        if not self._valid_ask(msg.slot, msg.label, msg.prefix, 0) or not isinstance(msg.owner, str):
            raise BadMessage("malformed transfer")
        key, new = (msg.owner, msg.slot), (msg.new_owner, msg.number)
        permit = self.permits.pop(key, None)
        allowed = msg.owner == msg.sender or (
            permit is not None and permit[0] == msg.token and self.round_no - permit[1] <= 2 * EXPIRY_ROUNDS
        )
        if not allowed or key not in self.inbound or new in self.inbound:
            self.bus.send(msg.new_owner, Lost(self.me, (msg.number,)))  # the new owner routes its microbatch anew
            return
        self._rekey(key, new, msg.label, msg.prefix)
        self.matched.pop(key, None)

    def _rekey(self, key: SlotKey, new: SlotKey, label: str, prefix: float) -> InSlot:
        """In-slot `key` now carries the microbatch of `new` (label, path cost up to the upstream holder): the slot
        and the chains behind it stay; the new holder is told what they cost (and go through) afresh."""
        slot = self.inbound.pop(key)
        slot.label, slot.prefix = label, float(prefix) + self.card.compute_s
        slot.sent_cost = slot.sent_route = None
        self.inbound[new] = slot
        for out in self.outbound.values():
            if out.paired == key:
                out.paired = new
        return slot

    def _switch(self) -> None:
        """i': the exchange's microbatch moves to its new slot now that the holders have re-keyed."""
        for key, new, old in self.switches:
            slot = self.inbound.get(key)
            self.outbound.pop(old, None)
            if slot is not None and slot.out == old:  # (new is gone if its holder died meanwhile: route anew)
                slot.out = new if new in self.outbound else None
                self.exchanges += slot.out is not None
            elif new in self.outbound:
                self._release_out(new)
        self.switches.clear()

    # ------------------------------------------------------------------------------------------- takeover
    # Rounds: t, i hands its costly microbatch A (from h's slot n, on to j) to a same-stage peer k with room that
    # would carry it more cheaply (Handover); t+1, k checks with its own figures, reserves the slot and its own
    # slot at j (held, j not told yet) and answers Taken; t+2, i tells j (Transfer: its slot is now k's) and h
    # (Moved); t+3, j re-keys, h points its slot at k and i drops A: the path is whole at the end of every round.

    def _on_handover(self, msg: Handover, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage)
        up = self.known.get(msg.up) if isinstance(msg.up, str) else None
        nxt = self.known.get(msg.peer) if isinstance(msg.peer, str) and msg.peer else None
        if up is None or up.stage != self.card.stage - 1 or (nxt is None) != self.is_last:
            raise BadMessage("handover from or to a peer of the wrong stage")
        if nxt is not None and nxt.stage != self.card.stage + 1:
            raise BadMessage("handover to a next hop of the wrong stage")
        if not self._valid_ask(msg.slot, msg.label, msg.prefix, msg.share):
            raise BadMessage("malformed handover")
        if not (isinstance(msg.cost, float | int) and 0 <= msg.cost < MAX_COST):
            raise BadMessage("handover cost negative, NaN or huge")
        chain = self._valid_cost(msg.chain)
        key = (msg.up, msg.slot)
        here = self.card.compute_s + self.costs.link(msg.up, self.me)
        if nxt is None:
            rest = self.costs.link(self.me, self.sink_regions[msg.label])
        else:
            rest = self.costs.link(self.me, msg.peer) + chain.get(msg.label, INF)
        if key in self.inbound or self.spare <= 0 or here + rest >= msg.cost - self.cfg.margin:
            self.bus.send(msg.sender, Handback(self.me, msg.up, msg.slot))
            return
        prefix = float(msg.prefix) + here
        slot = InSlot(msg.label, prefix, share=float(msg.share), quiet_until=self.round_no + 2)
        slot.swapped = self.round_no
        self.inbound[key] = slot
        self.adopted[key] = (msg.sender, self.round_no)
        number, to_j = -1, 0.0
        if nxt is not None:
            number = self.next_no
            self.next_no += 1
            to_j = round(prefix + self.costs.link(self.me, msg.peer), 4)
            self.outbound[number] = OutSlot(
                msg.peer,
                key,
                self.round_no,
                held=True,
                chain=chain,
                sent=(msg.label, to_j),
                quiet_until=self.round_no + 2,
            )
            slot.out = number
        self.bus.send(msg.sender, Taken(self.me, msg.up, msg.slot, number, to_j))

    def _on_taken(self, msg: Taken, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage)
        if not (isinstance(msg.slot, int) and isinstance(msg.number, int) and isinstance(msg.prefix, float | int)):
            raise BadMessage("malformed taken")
        key = (msg.up, msg.slot)
        pending = self.handovers.get(key)
        slot = self.inbound.get(key)
        out = self._held_out(slot) if slot is not None else None
        if pending is None or pending[0] != msg.sender or slot is None or (not self.is_last and out is None):
            if pending is not None and pending[0] == msg.sender:
                del self.handovers[key]
            self.bus.send(msg.sender, Handback(self.me, msg.up, msg.slot))  # gone meanwhile: k drops its reservation
            return
        if out is not None:
            assert slot.out is not None
            out.quiet_until = self.round_no + 2 * EXPIRY_ROUNDS  # no more updates to j about it
            self.bus.send(
                out.peer, Transfer(self.me, self.me, slot.out, msg.sender, msg.number, slot.label, msg.prefix)
            )
        self.bus.send(msg.up, Moved(self.me, msg.slot, msg.sender))
        self.leaving.append((key, slot.out, self.round_no + 1))
        self.takeovers += 1

    def _on_handback(self, msg: Handback, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage)
        key = (msg.up, msg.slot)
        if self.handovers.get(key, ("",))[0] == msg.sender:
            del self.handovers[key]  # declined: A stays here
        elif self.adopted.get(key, ("",))[0] == msg.sender and key in self.inbound:
            del self.adopted[key]  # the microbatch left before the handover: drop the reservation quietly
            slot = self.inbound.pop(key)
            if slot.out is not None:
                self.outbound.pop(slot.out, None)

    def _on_moved(self, msg: Moved, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage + 1)
        peer = self.known.get(msg.peer) if isinstance(msg.peer, str) else None
        if peer is None or peer.stage != card.stage or not isinstance(msg.slot, int):
            raise BadMessage("moved to an unknown or wrong-stage peer")
        out = self.outbound.get(msg.slot)
        if out is None or out.peer != msg.sender or not out.held:
            self.bus.send(msg.peer, Release(self.me, (msg.slot,)))  # we gave it up meanwhile
            return
        out.peer = msg.peer  # this round the old holder drops it and the next hop re-keys it

    def _leave(self) -> None:
        """Handed-over microbatches leave (their upstream points at the new holder from this round on)."""
        due = [e for e in self.leaving if e[2] <= self.round_no]
        self.leaving = [e for e in self.leaving if e[2] > self.round_no]
        for key, n, _ in due:
            self.handovers.pop(key, None)
            slot = self.inbound.get(key)
            if slot is not None and slot.out == n:
                del self.inbound[key]
                if n is not None:
                    self.outbound.pop(n, None)

    def _hand_over(self) -> None:
        """My costliest microbatch goes to a same-stage peer with room (from the directory: nearest the upstream
        and nearest the downstream hop) that carries it more cheaply between the same hops. One at a time."""
        self._forget(self.handovers, self.adopted)
        lookup = getattr(self._directory, "lookup", None)
        # Adjacent stages hand over in turn (a handover takes 4 rounds): the upstream of a microbatch being handed
        # over must not hand over the same slot from its side at the same time.
        window = self.round_no % 8 == 4 * (self.card.stage % 2)
        if not self.cfg.takeover or self.is_data or self.handovers or lookup is None or not window:
            return
        for key in self._costliest_first():
            slot = self.inbound[key]
            if key in self.adopted or not (self._rested(slot) if self.is_last else self._exchangeable(slot)):
                continue
            slot.offered = self.round_no
            up = key[0]
            before = slot.prefix - self.card.compute_s - self.costs.link(up, self.me)
            nxt, chain = "", {}
            if not self.is_last:
                assert slot.out is not None
                nxt, chain = self.outbound[slot.out].peer, self.outbound[slot.out].chain
            via = (nxt, chain, slot.label)
            cost = self.costs.link(up, self.me) + self.card.compute_s + self._onwards(self.me, *via)  # from `up` on
            best = None
            for near in (up, nxt or self.sink_regions[slot.label]):
                for c in lookup(self.card.stage, near, self.cfg.lookup // 2, self.rng):
                    if c.peer_id == self.me or c.stage != self.card.stage:
                        continue
                    est = self.costs.link(up, c.peer_id) + c.compute_s + self._onwards(c.peer_id, *via)
                    if est < cost - self.cfg.margin and (best is None or est < best[0]):
                        best = (est, c.peer_id)
            if best is None:
                return  # one slot looked at per round: the lookups are bounded
            self.handovers[key] = (best[1], self.round_no)
            entry = (up, key[1], slot.label, round(before, 4), slot.share, round(cost, 4), nxt)
            self.bus.send(best[1], Handover(self.me, *entry, tuple(sorted(chain.items()))))
            return

    def _onwards(self, peer: str, nxt: str, chain: dict[str, float], label: str) -> float:
        """From `peer` to the sink over next hop `nxt` and its chain (no next hop: straight home)."""
        if not nxt:
            return self.costs.link(peer, self.sink_regions[label])
        return self.costs.link(peer, nxt) + chain.get(label, INF)

    def _exchangeable(self, slot: InSlot, partner: bool = False) -> bool:
        """On a complete chain, settled (not swapped lately), not offered now (nor lately, to be offered)."""
        if slot.out is None or slot.out in self.offers or self._held_out(slot) is None:
            return False
        out = self.outbound[slot.out]
        if self.round_no < out.quiet_until or slot.label not in out.chain:
            return False
        return self.round_no - slot.swapped >= self.cfg.swap_cooldown if partner else self._rested(slot)

    def _rested(self, slot: InSlot) -> bool:
        """Not swapped, offered or handed over within the exchange cooldown."""
        return self.round_no - max(slot.swapped, slot.offered) >= self.cfg.exchange_cooldown

    def _costliest_first(self) -> list[SlotKey]:
        """My in-slots, the costliest path first (those without a next hop yet last)."""
        return sorted(self.inbound, key=lambda k: -self._total(k) if self.inbound[k].out is not None else 0)

    def _forget(self, *tables: dict) -> None:
        """Drop pending entries (each value ends with the round it was made) older than two request round trips."""
        for table in tables:
            for key in [k for k, v in table.items() if self.round_no - v[-1] > 2 * EXPIRY_ROUNDS]:
                del table[key]

    def _offer(self) -> None:
        """Offer my costliest microbatch whose continuation a next-stage peer could carry more cheaply (by its
        advert) for an exchange: in a saturated stage a costly path cannot move (no room), and the local swap
        only re-pairs continuations at one relay. One offer at a time."""
        # No partner took an offer this old (a Swapped comes 3 rounds after); permits are held by its next hop,
        # which may be a last-stage relay that never offers anything itself.
        self._forget(self.offers, self.permits, self.withdrawn)
        if not self.cfg.exchange or self.offers or self.is_last:
            return
        for key in self._costliest_first():
            slot = self.inbound[key]
            if key in self.handovers or not self._exchangeable(slot):
                continue
            assert slot.out is not None
            out = self.outbound[slot.out]
            here = self._value(slot.out, slot.label)
            slot.offered = self.round_no
            options = [
                (self._option(p, slot.label), p)
                for p, st in self.next.items()
                if st.heard and p != out.peer and slot.label in st.cost
            ]
            if not options or min(options)[0] >= here - self.cfg.margin:
                continue
            jstar = min(options)[1]
            number = self.next_no
            self.next_no += 1
            self.offers[slot.out] = (number, jstar, self.round_no)
            chain = tuple(sorted(out.chain.items()))
            self.bus.send(out.peer, Permit(self.me, slot.out, number))
            self.bus.send(jstar, Offer(self.me, slot.out, out.peer, slot.label, round(slot.prefix, 4), chain, number))
            return

    # ----------------------------------------------------------------------------------------- slot changes

    def _new_out(self, key: SlotKey, peer: str, move: bool) -> None:
        slot = self.inbound[key]
        n = self.next_no
        self.next_no += 1
        prefix = round(slot.prefix + self._hop(peer), 4)
        self.outbound[n] = OutSlot(peer, key, self.round_no, move=move, sent=(slot.label, prefix))
        if not move:
            slot.out = n
        self._requests[peer].append((n, slot.label, prefix, slot.share))
        state = self.next.get(peer)
        if state is not None:
            state.spare = max(0, state.spare - 1)

    def _drop_out(self, n: int) -> None:
        out = self.outbound.pop(n)
        slot = self.inbound.get(out.paired)
        if slot is not None and slot.out == n:
            slot.out = None

    def _release_out(self, n: int) -> None:
        out = self.outbound.pop(n)
        self.bus.send(out.peer, Release(self.me, (n,)))

    def _drop_in(self, key: SlotKey) -> None:
        """The microbatch left: its chain downstream (and any chain being built for it) is given back."""
        self.inbound.pop(key)
        for n in [n for n, o in self.outbound.items() if o.paired == key]:
            self._release_out(n)

    def _revoke(self, keys: list[SlotKey]) -> None:
        lost: dict[str, list[int]] = defaultdict(list)
        for key in keys:
            self._drop_in(key)
            lost[key[0]].append(key[1])
        for dst, ns in lost.items():
            self.bus.send(dst, Lost(self.me, tuple(ns)))

    # ------------------------------------------------------------------------------------------------ costs

    def _hop(self, peer: str) -> float:
        state = self.next.get(peer)
        return state.hop if state is not None else self.costs.link(self.me, peer)

    def _option(self, peer: str, label: str) -> float:
        """Cost of sending a new microbatch of `label` to `peer`: link + its advert (an estimate until heard)."""
        state = self.next[peer]
        if state.heard:
            return state.hop + state.cost.get(label, INF)
        card = state.card  # not heard yet: assume the rest of the path stays in that peer's region
        rest = (self.n_stages - card.stage + 1) * card.compute_s
        return state.hop + rest + self.costs.link(peer, self.sink_regions[label])

    def _value(self, n: int, label: str) -> float:
        """Cost of carrying a microbatch of `label` on out-slot n from here to its sink."""
        out = self.outbound[n]
        if label in out.chain:
            return self._hop(out.peer) + out.chain[label]
        if out.peer in self.next:
            return self._option(out.peer, label)
        return INF

    def _options(self, label: str) -> list[tuple[float, str]]:
        return sorted((v, p) for p, st in self.next.items() if st.spare > 0 and (v := self._option(p, label)) < INF)

    def _total(self, key: SlotKey) -> float:
        slot = self.inbound[key]
        return slot.prefix + (self._value(slot.out, slot.label) if slot.out is not None else INF)

    # -------------------------------------------------------------------------------------------- decisions

    def _expire(self) -> None:
        """A request unanswered for longer than a round trip (dropped, or the peer died) is given up."""
        for n in [n for n, o in self.outbound.items() if not o.held and self.round_no - o.asked > EXPIRY_ROUNDS]:
            peer = self.outbound[n].peer
            self._drop_out(n)
            self.bus.send(peer, Release(self.me, (n,)))  # in case the grant is still on its way
            if peer in self.next:
                self.next[peer].spare = 0

    def _route(self, directory) -> None:
        """Every microbatch without a next hop asks the cheapest peer with room; after `patience` rounds
        without one, a relay revokes it so that its sender routes it elsewhere."""
        waiting = sorted((k for k, s in self.inbound.items() if s.out is None), key=lambda k: -self.inbound[k].prefix)
        if not waiting or (self.is_data and self.round_no < self.cfg.settle):
            return
        give_up = []
        for key in waiting:
            slot = self.inbound[key]
            options = self._options(slot.label)
            # None, or turned down before: what we believe of our neighbours' room is stale, ask the directory.
            stale = not options or slot.rejected > 0
            due = self.round_no - self.last_refresh >= self.cfg.refresh_every
            if stale and due and self._refresh(directory, self.cfg.lookup):
                options = self._options(slot.label)
            if self.is_data:
                slot.share = round(len(self.units()) / len(self.inbound), 2)
                # A data node sends nothing into a path that looks blocked (it would only hold room that others
                # need) unless it is served less than its fair share: then it tries, and wins contested room.
                if slot.share >= self.cfg.fair_share:
                    options = [(v, p) for v, p in options if v < self.cfg.blocked_penalty]
            if options:
                self._new_out(key, self._pick(options, slot.rejected), move=False)
                continue
            if self._starving() and (full := sorted((st.hop, p) for p, st in self.next.items())):
                self._new_out(key, full[0][1], move=False)  # no room anywhere: the relay claims a slot for us
                continue
            slot.waited += 1
            if slot.waited > self.cfg.patience and not self.is_data:
                give_up.append(key)
        self._revoke(give_up)

    def _starving(self) -> bool:
        """With `evict`: a data node with no first hop and no request out asks a full stage-1 relay anyway, one
        microbatch at a time (see `_claim_for`)."""
        if not (self.is_data and self.cfg.evict) or self.units():
            return False
        return all(o.held for o in self.outbound.values())

    def _pick(self, options: list[tuple[float, str]], rejected: int) -> str:
        """One of the near-cheapest peers, at random by believed room: upstream peers that all see the same
        cheapest peer would otherwise all ask it at once, and all but a few be rejected (a round trip each).
        Each time a microbatch was turned down the circle widens: where room is scarce, speed beats thrift."""
        best = options[0][0]
        spread = self.cfg.spread * 2 ** min(rejected, 4)
        near = [(v, p) for v, p in options if v <= best + 5 * spread]
        weights = [self.next[p].spare * math.exp(-(v - best) / spread) for v, p in near]
        return self.rng.choices([p for _, p in near], weights=weights)[0]

    def _move(self) -> None:
        """A microbatch on a costly chain has a cheaper one built beside it (the costliest paths first); it
        switches once the new chain is complete and still cheaper, and the old one is given back."""
        building = {o.paired: n for n, o in self.outbound.items() if o.move}
        for key, n in building.items():
            new, slot = self.outbound[n], self.inbound.get(key)
            if slot is None or slot.out is None or slot.out not in self.outbound:
                self._release_out(n)
            elif new.held and (new.chain or not self.cfg.build_beside):
                if self._value(n, slot.label) < self._value(slot.out, slot.label) - self.cfg.margin:
                    self._release_out(slot.out)
                    slot.out, new.move = n, False
                else:
                    self._release_out(n)
            elif self.round_no - new.asked > self.cfg.build_rounds:
                self._release_out(n)
        moves = self.cfg.moves
        carried = [  # only microbatches on complete chains move: a move must not leave one without a path
            k
            for k, s in self.inbound.items()
            if (o := self._held_out(s)) is not None and s.label in o.chain and k not in building
        ]
        for key in sorted(carried, key=lambda k: -self._total(k)):
            if moves <= 0:
                return
            slot = self.inbound[key]
            assert slot.out is not None
            here = self._value(slot.out, slot.label)
            options = [
                (v, p)
                for v, p in self._options(slot.label)
                if p != self.outbound[slot.out].peer and self.next[p].heard and self.next[p].spare >= 2
            ]
            if options and options[0][0] < here - self.cfg.margin:
                self._new_out(key, options[0][1], move=True)
                moves -= 1

    def _swap(self) -> None:
        """Two microbatches here swap continuations when that lowers the costlier of their two paths."""
        if self.is_data:
            return
        keys = sorted(
            k
            for k, s in self.inbound.items()
            if (o := self._held_out(s)) is not None
            and s.label in o.chain
            and self.round_no - s.swapped >= self.cfg.swap_cooldown
            and s.out not in self.offers
            and k not in self.handovers
        )
        if len(keys) < 2:
            return
        temperature = self.cfg.temperature0 * self.cfg.cooling**self.round_no
        for a in range(len(keys)):
            for b in range(a + 1, len(keys)):
                sa, sb = self.inbound[keys[a]], self.inbound[keys[b]]
                oa, ob = sa.out, sb.out
                assert oa is not None and ob is not None
                if sb.label not in self.outbound[oa].chain or sa.label not in self.outbound[ob].chain:
                    continue
                old = max(sa.prefix + self._value(oa, sa.label), sb.prefix + self._value(ob, sb.label))
                new = max(sa.prefix + self._value(ob, sa.label), sb.prefix + self._value(oa, sb.label))
                delta = new - old
                if delta < -self.cfg.margin or (delta > 0 and self._anneal(delta, temperature)):
                    sa.out, sb.out = ob, oa
                    sa.swapped = sb.swapped = self.round_no
                    self.outbound[ob].paired, self.outbound[oa].paired = keys[a], keys[b]

    def _anneal(self, delta: float, temperature: float) -> bool:
        return temperature > 1e-6 and self.rng.random() < math.exp(-delta / temperature)

    def _send_updates(self) -> None:
        """Labels and prefixes travel down the chains when the microbatch on a slot changed."""
        for n, out in self.outbound.items():
            slot = self.inbound.get(out.paired)
            if not out.held or slot is None or self.round_no < out.quiet_until or n in self.offers:
                continue
            want = (slot.label, round(slot.prefix + self._hop(out.peer), 4))
            if want != out.sent:
                out.sent = want
                self._requests[out.peer].append((n, *want, slot.share))

    def _flush(self) -> None:
        for dst, slots in self._requests.items():
            self._send_batches(dst, Request, slots)
        self._requests.clear()

    def _send_batches(self, dst: str, kind: type[Request] | type[ChainCost] | type[Route], items: list) -> None:
        """Per-slot entries to one peer, in messages of at most MAX_BATCH (validated lists are bounded)."""
        for k in range(0, len(items), MAX_BATCH):
            self.bus.send(dst, kind(self.me, tuple(items[k : k + MAX_BATCH])))

    def _chain_of(self, slot: InSlot) -> dict[str, float]:
        c = self.card.compute_s
        if self.is_last:
            return {g: c + self.costs.link(self.me, rep) for g, rep in self.sink_regions.items()}
        out = self._held_out(slot)
        if out is None or not out.chain:
            return {}
        assert slot.out is not None
        return {g: c + self._value(slot.out, g) for g in out.chain}

    def _cost_of(self, slot: InSlot) -> tuple[tuple[str, float], ...]:
        return tuple(sorted((g, round(v, 4)) for g, v in self._chain_of(slot).items() if v < MAX_COST))

    def _report_upstream(self, kind: type[ChainCost] | type[Route], sent: str, value_of) -> None:
        """Tell each upstream holder, per slot, what the chain behind it is now by `value_of` (its cost per sink
        region, or with `routes` its relays), when that changed from what it was told (the slot's `sent` field)."""
        if self.is_data:
            return
        updates: dict[str, list[tuple[int, tuple]]] = defaultdict(list)
        for (up, n), slot in self.inbound.items():
            if self.round_no < slot.quiet_until:
                continue
            value, told = value_of(slot), getattr(slot, sent)
            if value != told and (value or told):
                setattr(slot, sent, value)
                updates[up].append((n, value))
        for dst, items in updates.items():
            self._send_batches(dst, kind, items)

    def _route_of(self, slot: InSlot) -> tuple[str, ...]:
        if self.is_last:
            return (self.me,)
        out = self._held_out(slot)
        return (self.me, *out.route) if out is not None and out.route else ()

    def paths(self) -> list[list[str]]:
        """A data node's complete paths, cheapest first, relay by relay (with `AgentConfig.routes`)."""
        return [list(o.route) for _, o in self.units() if len(o.route) == self.n_stages and o.route[0] == o.peer]

    def _advertise(self) -> None:
        if self.is_data:
            return
        self.my_cost = self._cost_to_sink()
        advert_key = (self.spare, tuple(sorted((g, round(c, 2)) for g, c in self.my_cost.items())))
        if advert_key == self.last_advert:
            return
        self.last_advert = advert_key
        msg = Advert(self.me, self.card.stage, advert_key[0], self.card.compute_s, advert_key[1])
        for peer in sorted(self.subscribers):
            self.bus.send(peer, msg)

    def _cost_to_sink(self) -> dict[str, float]:
        """Distance-vector: my compute + the cheapest next hop with room (a stage-S node: the hop home)."""
        c = self.card.compute_s
        if self.is_last:
            return {g: c + self.costs.link(self.me, rep) for g, rep in self.sink_regions.items()}
        roomy = [p for p, st in self.next.items() if st.spare > 0]
        # No next peer with room: a last resort, priced high rather than unreachable, so that room freed by a
        # crash downstream is used at once instead of after the news climbed back up stage by stage.
        penalty = 0.0 if roomy else self.cfg.blocked_penalty
        best = dict.fromkeys(self.sink_regions, INF)
        for p in roomy or self.next:
            state = self.next[p]
            if state.heard:
                for g, v in state.cost.items():
                    best[g] = min(best[g], state.hop + v)
            else:
                for g in best:
                    best[g] = min(best[g], self._option(p, g))
        return {g: c + v + penalty for g, v in best.items() if v + penalty < MAX_COST}

    def _refresh(self, directory, k: int) -> set[str]:
        """Ask the DHT directory for next-stage peers with room (bounded), cheapest links first."""
        self.last_refresh = self.round_no
        found = set()
        for card in directory.lookup(self.card.stage + 1, self.me, k, self.rng):
            if card.peer_id not in self.next:
                self._evict_idle_next()
                self.add_next(card)
            state = self.next.get(card.peer_id)
            if state is not None:  # the directory's record is fresher than our last word from it
                state.spare = max(state.spare, 1)
                found.add(card.peer_id)
        return found

    def _evict_idle_next(self) -> None:
        if len(self.next) < 2 * self.cfg.neighbours:
            return
        used = {o.peer for o in self.outbound.values()}
        idle = [p for p, st in self.next.items() if p not in used and st.spare == 0]
        if idle:
            del self.next[self.rng.choice(sorted(idle))]
