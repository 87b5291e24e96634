"""What one agent holds: the peer cards it knows, its config, its slots and neighbours, and the tables of the
optional moves (each commented with the file that uses it). No behaviour beyond bookkeeping: the protocol is
core.py, the moves are their own files.

A *slot* is one microbatch of room on a link: relay i holds slot n at next-stage relay j once j granted it (j keys
it (i, n): an `InSlot`; i keeps an `OutSlot` n pointing at j). Each microbatch is one chain of slots from its data
node through one relay per stage, back to the data node. A slot carries the microbatch's *label* (its origin
region: where it must return) and its *prefix* (path cost so far).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

from gwtf.routing.agent.bus import Bus

INF = float("inf")
SlotKey = tuple[str, int]  # (upstream peer, its slot number)
MAX_BATCH = 64  # slots per message: bounded lists
MAX_COST = 1e6  # seconds: larger costs or prefixes are malformed
EXPIRY_ROUNDS = 3  # a request is answered in 2 rounds (request, reply)
# Rounds after which a held slot's chain cost is reported upstream, and its (label, prefix) sent downstream, again
# though unchanged: a live swarm can lose a Release or a Lost (a call that timed out), and a slot would be held on
# one side only, for good; a report for a slot the upstream peer no longer has is answered with a Release
# (core.py, _on_chaincost), an ask for one the downstream peer no longer holds is granted afresh or rejected.
REPORT_AGAIN_ROUNDS = 50


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
    moves: int = 0  # cheaper next hops tried per round (moves.py)
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
    deflect: bool = True  # requests a full relay cannot grant go to a same-stage peer with room (deflect.py)
    settle: int = 0  # rounds a data node lets the cost adverts settle before it sends its first microbatch
    # Cross-relay exchanges (Offer, Permit, Match, Transfer, Swapped; exchange.py). Off by default: measured
    # in benchmarks.flow (40 rounds, N = 1000, 2 seeds), they cut iteration time (0.530 -> 0.514 of SWARM's) but
    # leave the worst path higher at round 40 (1.78 -> 1.96; lower only after 45 or more rounds), and at N = 100
    # (6 seeds) both are worse (worst path 1.165 -> 1.247, iteration time 0.633 -> 0.641).
    exchange: bool = False
    # A relay hands a costly microbatch over to a same-stage peer with room that carries it more cheaply between
    # the same upstream and downstream hops (design.md: "a node with spare capacity takes over another's flow";
    # takeover.py). Off by default: measured in benchmarks.flow (40 rounds), at N = 100 (6 seeds) it
    # lowers the worst path (1.165 -> 1.132) and total cost (1.196 -> 1.145) at the same iteration time; at
    # N = 1000 (2 seeds) it lowers total cost (1.142 -> 1.125) and iteration time (0.530 -> 0.513 of SWARM's) but
    # the room it takes slows the fill: worst path 1.78 -> 1.99 at round 40, throughput 0.996 of the optimum,
    # and 0.92 instead of 0.96 reached 20 rounds after a 20 % crash.
    takeover: bool = False
    exchange_cooldown: int = 10  # rounds a microbatch waits after a swap or an offer before it is offered again
    routes: bool = False  # report the relays of each chain upstream (`Route`): on in a live swarm (gwtf.routing.p2p)
    evict: bool = False  # a data node with no first hop may claim one from a data node with two (claims.py)

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
    cost_told: int = -(10**9)  # round its chain cost was last reported upstream (REPORT_AGAIN_ROUNDS)
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
    updated: int = -(10**9)  # round its (label, prefix) was last sent (REPORT_AGAIN_ROUNDS)


@dataclass
class NeighbourState:
    card: PeerCard
    spare: int
    hop: float  # the link term to it (measured figures do not change within a plan)
    heard: bool = False  # an advert arrived: `cost` is what it says (a missing region: unreachable)
    cost: dict[str, float] = field(default_factory=dict)


class AgentState:
    """One node's agent, as data. Stage 0 is a data node (source and sink of its units)."""

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
        self.last_advert_round = 0  # when it was sent (sent again unchanged every REPORT_AGAIN_ROUNDS rounds)
        self.rejected = 0  # invalid messages dropped
        self.round_no = 0
        self.last_refresh = -(10**9)
        self._requests: dict[str, list[tuple[int, str, float, float]]] = defaultdict(list)
        self._asks: list[tuple[str, int, str, float, float]] = []  # new slot requests of this round
        self._directory = None
        # deflect.py
        self._via: set[SlotKey] = set()  # of the asks, the ones another relay deflected here (not deflected again)
        # exchange.py
        self.offers: dict[int, tuple[int, str, int]] = {}  # my out-slot offered -> (number at j*, j*, round)
        self.matched: dict[SlotKey, int] = {}  # in-slots I proposed for an exchange -> round
        self.permits: dict[SlotKey, tuple[int, int]] = {}  # in-slot -> (token, round) its owner may give away
        self.switches: list[tuple[SlotKey, int, int]] = []  # (in-slot, new out-slot, old out-slot): next round
        self.withdrawn: dict[int, tuple[int, str, int]] = {}  # offers withdrawn for a mirror match, as `offers`
        self.exchanges = 0  # exchanges completed on my side
        # takeover.py
        self.handovers: dict[SlotKey, tuple[str, int]] = {}  # in-slot handed over -> (to whom, round)
        self.adopted: dict[SlotKey, tuple[str, int]] = {}  # in-slot reserved for a handover -> (from whom, round)
        self.leaving: list[tuple[SlotKey, int | None, int]] = []  # handed over: dropped at the given round
        self.takeovers = 0  # microbatches handed over to a same-stage peer
        # claims.py
        self.claims: dict[SlotKey, tuple[tuple[str, int, str, float, float], int]] = {}  # see Claims._claim_for
        self.claimed = 0  # slots handed to a data node that had no first hop (see Claims._claim_for)

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

    def _held_out(self, slot: InSlot) -> OutSlot | None:
        out = self.outbound.get(slot.out) if slot.out is not None else None
        return out if out is not None and out.held else None

    def _forget(self, *tables: dict) -> None:
        """Drop pending entries (each value ends with the round it was made) older than two request round trips."""
        for table in tables:
            for key in [k for k, v in table.items() if self.round_no - v[-1] > 2 * EXPIRY_ROUNDS]:
                del table[key]
