"""Routing microbatches through stage replicas (GWTF flows, design.md section 5).

Files:
    base.py        the interface the runtime uses: RelayInfo, DataInfo, SwarmView, Router (plan, reroute, lifecycle)
    config.py      RoutingConfig: the run's router and the agents' round period
    registry.py    ROUTERS by config name, make_router
    cost.py        link figures (region matrix from gwtf/resources/regions.json, measured overrides), d_ij
    baselines.py   round-robin and SWARM (earliest expected finish by a moving average of measured speed)
    graph.py       the flow graph (networkx): relays split into in/out vertices, networkx reference solver
    optimum.py     the yardstick with ortools: min-cost max-flow, worst path, multi-commodity LP / MIP; OracleRouter
    agent/         the decentralized GWTF agent: its messages and their wire codec, its state, the core protocol
                   and each optional move (exchange, takeover, claims, routes, ...) in a file of its own
    protocol.py    ProtocolRun: every agent of a view stepping in synchronous rounds over the in-process bus
    gwtf_router.py GWTFRouter (router "gwtf"): a data node runs every agent over its view of the swarm
    p2p.py         router "gwtf-p2p": AgentService (one agent per live node, messages over the runtime's
                   transport) and P2PRouter
    simulator.py   topologies from the region matrix, protocol rounds and discrete-event iteration timing
"""

from gwtf.routing.base import DataInfo, RelayInfo, Router, SwarmView
from gwtf.routing.cost import LinkModel
from gwtf.routing.registry import make_router

__all__ = ["DataInfo", "LinkModel", "RelayInfo", "Router", "SwarmView", "make_router"]
