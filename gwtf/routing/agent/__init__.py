"""The decentralized GWTF agent: one per node, local knowledge only, messages through a bus.

Each node's agent negotiates with its neighbours, in rounds, which next-stage relay continues each microbatch it
carries: a *slot* is one microbatch of room on a link, each microbatch one chain of slots from its data node through
one relay per stage and back (state.py). The core protocol (core.py) advertises costs to the sinks, grants requests
within capacity, routes, swaps locally and reports chain costs upstream. Optional moves, each behind an AgentConfig
flag, add to it through the core's hooks, one file each; `Agent` (agent.py) composes them all. The simulator steps
every agent of a swarm over an in-process bus (gwtf.routing.protocol); a live node steps its own and sends its
messages over the transport (gwtf.routing.p2p, with codec.py).

Files (each imports only those above it):
    messages.py   the 21 messages (Advert, Request, Reply, ... ; Message, their union), and which file sends which
    codec.py      their wire form for router gwtf-p2p: encode, decode (checks every field and the sender)
    bus.py        Bus, what an agent sends through; InProcessBus (delivered next round)
    state.py      what an agent holds: PeerCard, AgentConfig, InSlot/OutSlot/NeighbourState, AgentState (the
                  slots, neighbours and the moves' tables); the limits (MAX_BATCH, MAX_COST, EXPIRY_ROUNDS,
                  REPORT_AGAIN_ROUNDS)
    core.py       AgentCore: the protocol (adverts, request/grant, routing, swaps, chain costs, crashes, joins)
                  and the hooks the moves override
    deflect.py    Deflections (`deflect`, on by default): requests a full relay cannot grant go to peers with room
    claims.py     Claims (`evict`): a data node with no first hop claims one from a data node with two
    routes.py     RouteReports (`routes`): the relays of each chain reported upstream; a data node's `paths`
    moves.py      Moves (`moves` > 0): a cheaper chain built beside a costly one
    exchange.py   Exchanges (`exchange`): two same-stage relays swap next hops (Offer, Match, Transfer, ...)
    takeover.py   Takeovers (`takeover`): a relay hands a costly microbatch to a same-stage peer with room
    agent.py      Agent: the core with every move
"""

from gwtf.routing.agent.agent import Agent
from gwtf.routing.agent.bus import Bus, InProcessBus
from gwtf.routing.agent.codec import MESSAGE_TYPES, decode, encode
from gwtf.routing.agent.core import AgentCore
from gwtf.routing.agent.messages import (
    Advert,
    ChainCost,
    Claim,
    Declined,
    Deflect,
    Handback,
    Handover,
    Hello,
    Lost,
    Match,
    Message,
    Moved,
    Offer,
    Permit,
    Release,
    Reply,
    Request,
    Route,
    Swapped,
    Taken,
    Transfer,
    Yield,
)
from gwtf.routing.agent.state import (
    EXPIRY_ROUNDS,
    INF,
    MAX_BATCH,
    MAX_COST,
    REPORT_AGAIN_ROUNDS,
    AgentConfig,
    AgentState,
    Costs,
    InSlot,
    NeighbourState,
    OutSlot,
    PeerCard,
    SlotKey,
)

__all__ = [
    "EXPIRY_ROUNDS",
    "INF",
    "MAX_BATCH",
    "MAX_COST",
    "MESSAGE_TYPES",
    "REPORT_AGAIN_ROUNDS",
    "Advert",
    "Agent",
    "AgentConfig",
    "AgentCore",
    "AgentState",
    "Bus",
    "ChainCost",
    "Claim",
    "Costs",
    "Declined",
    "Deflect",
    "Handback",
    "Handover",
    "Hello",
    "InProcessBus",
    "InSlot",
    "Lost",
    "Match",
    "Message",
    "Moved",
    "NeighbourState",
    "Offer",
    "OutSlot",
    "PeerCard",
    "Permit",
    "Release",
    "Reply",
    "Request",
    "Route",
    "SlotKey",
    "Swapped",
    "Taken",
    "Transfer",
    "Yield",
    "decode",
    "encode",
]
