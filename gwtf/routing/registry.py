"""Routers by config name: the one place that knows every implementation."""

from __future__ import annotations

from gwtf.routing.base import Router
from gwtf.routing.baselines import RoundRobinRouter, SwarmRouter
from gwtf.routing.config import ROUTER_NAMES, RoutingConfig
from gwtf.routing.gwtf_router import GWTFRouter
from gwtf.routing.optimum import OracleRouter
from gwtf.routing.p2p import P2PRouter

ROUTERS: dict[str, type[Router]] = {
    "gwtf": GWTFRouter,
    "gwtf-p2p": P2PRouter,
    "swarm": SwarmRouter,
    "round-robin": RoundRobinRouter,
    "oracle": OracleRouter,
}
assert tuple(sorted(ROUTERS)) == tuple(sorted(ROUTER_NAMES)), "gwtf.routing.config.ROUTER_NAMES is out of step"


def make_router(cfg: RoutingConfig | str, seed: int = 0) -> Router:
    """A router for the run's routing config (or a router name, with the config's other defaults)."""
    if isinstance(cfg, str):
        cfg = RoutingConfig(router=cfg)
    return ROUTERS[cfg.router](seed, routing=cfg)
