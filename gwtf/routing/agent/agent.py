"""`Agent`: the core protocol with every optional move. Each move's behaviour is behind its `AgentConfig` flag (its
handlers always run: a peer may use the move even where this node does not start it)."""

from __future__ import annotations

from gwtf.routing.agent.claims import Claims
from gwtf.routing.agent.core import AgentCore
from gwtf.routing.agent.deflect import Deflections
from gwtf.routing.agent.exchange import Exchanges
from gwtf.routing.agent.moves import Moves
from gwtf.routing.agent.routes import RouteReports
from gwtf.routing.agent.takeover import Takeovers


class Agent(Exchanges, Takeovers, Claims, Deflections, Moves, RouteReports, AgentCore):
    """One node's routing state machine. Stage 0 is a data node (source and sink of its units).

    Construction: `Agent(card, n_stages, costs, bus, sink_regions, cfg, seed)` (AgentState). A hook that two moves
    override runs them in this order (each does its part, then super()'s): at the start of a round exchanged
    microbatches switch before handed-over ones leave, and after routing a relay offers an exchange before it
    looks for a takeover (a microbatch just offered is not handed over in the same round)."""
