"""The run's routing settings (`[routing]` in a run config; `--set routing.router=swarm`)."""

from __future__ import annotations

from dataclasses import dataclass

from gwtf.errors import UserError

# The routers by config name (gwtf.routing.registry maps each to its class; a test keeps the two in step).
ROUTER_NAMES = ("gwtf", "gwtf-p2p", "swarm", "round-robin", "oracle")


@dataclass
class RoutingConfig:
    router: str = "round-robin"  # which router plans the microbatches' paths (ROUTER_NAMES)
    round_s: float = 0.1  # router "gwtf-p2p": seconds between two routing rounds of a node's agent

    def __post_init__(self) -> None:
        if self.router not in ROUTER_NAMES:
            raise UserError(f"routing.router={self.router!r} is unknown; choose one of {', '.join(ROUTER_NAMES)}")
        if not self.round_s > 0:
            raise UserError(f"routing.round_s={self.round_s} must be positive (seconds between two routing rounds)")
