"""The run's routing settings (`[routing]` in a run config; `--set routing.router=swarm`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gwtf.errors import UserError

# The routers by config name (gwtf.routing.registry maps each to its class; a test keeps the two in step).
ROUTER_NAMES = ("gwtf", "gwtf-p2p", "swarm", "round-robin", "oracle")


@dataclass
class RoutingConfig:
    router: str = "round-robin"  # which router plans the microbatches' paths (ROUTER_NAMES)
    round_s: float = 0.1  # router "gwtf-p2p": seconds between two routing rounds of a node's agent
    # The GWTF agent's optional improvement moves (routers "gwtf" and "gwtf-p2p"; gwtf.routing.agent.AgentConfig):
    # cheaper next hops built beside a costly chain (moves per round), same-stage relays swapping next hops, a
    # relay handing a costly microbatch to a same-stage peer with room. Off by default: where relays have spare
    # room they bring the plan near the optimum's (geo-wide: 0.93 -> 0.68 of SWARM's iteration time, all three),
    # but in benchmarks.flow's churned swarm of 1,000 they slowed the iteration (0.48 -> 0.55 of SWARM's).
    moves: int = 0
    exchange: bool = False
    takeover: bool = False

    def __post_init__(self) -> None:
        if self.router not in ROUTER_NAMES:
            raise UserError(f"routing.router={self.router!r} is unknown; choose one of {', '.join(ROUTER_NAMES)}")
        if not self.round_s > 0:
            raise UserError(f"routing.round_s={self.round_s} must be positive (seconds between two routing rounds)")
        if self.moves < 0:
            raise UserError(f"routing.moves={self.moves} must be >= 0 (cheaper next hops an agent tries per round)")

    def agent_moves(self) -> dict[str, Any]:
        """The AgentConfig fields these settings choose."""
        return {"moves": self.moves, "exchange": self.exchange, "takeover": self.takeover}
