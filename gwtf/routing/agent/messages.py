"""The messages GWTF agents send each other: one frozen dataclass each, every one naming its sender.

Fields are plain ints, floats, strings, tuples of them and, for `Match`, an `Offer`: what the wire codec (codec.py)
carries and checks. Who sends what:
    core.py       Advert, Hello, Request, Reply, Lost, Release, ChainCost
    routes.py     Route
    claims.py     Claim, Yield
    deflect.py    Deflect
    exchange.py   Offer, Permit, Match, Transfer, Declined, Swapped
    takeover.py   Handover, Taken, Handback, Moved (and a Transfer to the next hop)
`Message` is the union of all 21; its order is the codec's table of type names.
"""

from __future__ import annotations

from dataclasses import dataclass


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
