"""The flow graph of a swarm: relays grouped into bundles, split into in/out vertices joined by capacity arcs.

A bundle is a set of same-stage relays that every other peer reaches over the same link: one (stage, region)
when link figures come from the region matrix (so the graph has O(N + S * R^2) arcs, not O(N^2 / S)), one relay
when some peer pair has a measured override. The two are the same optimisation problem: inside a bundle the
relays are parallel arcs (capacity, compute cost) between the bundle's in and out vertices.

Data nodes are grouped into commodities the same way: data nodes with the same region and compute time are
interchangeable (their microbatches can take each other's paths), otherwise one commodity per data node.
Costs follow design.md: a relay's compute on its own arc, the link terms of d_ij on the arcs between bundles,
and the data node's compute on its source arc, so an s-t path costs exactly SwarmView.path_cost.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx

from gwtf.routing.base import SwarmView

COST_SCALE = 1e6  # integer solvers work in microseconds


@dataclass
class Bundle:
    stage: int
    key: str
    relays: list[str]


@dataclass
class Commodity:
    key: str
    data_nodes: list[str]
    demand: int
    rep: str  # a representative data node, for link figures


@dataclass
class FlowModel:
    view: SwarmView
    bundles: list[Bundle]
    commodities: list[Commodity]
    demands: dict[str, int] = field(default_factory=dict)  # per data node
    arcs: dict[tuple[int, int], float] = field(default_factory=dict)  # bundle -> next-stage bundle: link term
    sources: dict[tuple[int, int], float] = field(default_factory=dict)  # (commodity, stage-1 bundle): cost
    sinks: dict[tuple[int, int], float] = field(default_factory=dict)  # (stage-S bundle, commodity): cost

    def by_stage(self, stage: int) -> list[int]:
        return [i for i, b in enumerate(self.bundles) if b.stage == stage]

    @property
    def demand(self) -> int:
        return sum(c.demand for c in self.commodities)


def build_model(view: SwarmView, demands: dict[str, int], by_region: bool | None = None) -> FlowModel:
    """The bundle graph; by_region=None picks regions unless some link has a measured override."""
    if by_region is None:
        by_region = not view.links.measured
    bundles = _bundles(view, by_region)
    commodities = _commodities(view, demands, by_region)
    model = FlowModel(view, bundles, commodities, dict(demands))
    size = view.activation_bytes
    link = view.links.link_term
    for s in range(1, view.n_stages):
        for i in model.by_stage(s):
            for j in model.by_stage(s + 1):
                model.arcs[(i, j)] = link(bundles[i].relays[0], bundles[j].relays[0], size)
    for c, com in enumerate(commodities):
        compute = view.data_nodes[com.rep].compute_s
        for i in model.by_stage(1):
            model.sources[(c, i)] = compute + link(com.rep, bundles[i].relays[0], size)
        for i in model.by_stage(view.n_stages):
            model.sinks[(i, c)] = link(bundles[i].relays[0], com.rep, size)
    return model


def _bundles(view: SwarmView, by_region: bool) -> list[Bundle]:
    groups: dict[tuple[int, str], list[str]] = defaultdict(list)
    for relay in sorted(view.relays.values(), key=lambda r: r.peer_id):
        if relay.capacity > 0:
            key = str(relay.region) if by_region else relay.peer_id
            groups[(relay.stage, key)].append(relay.peer_id)
    return [Bundle(stage, key, peers) for (stage, key), peers in sorted(groups.items())]


def _commodities(view: SwarmView, demands: dict[str, int], by_region: bool) -> list[Commodity]:
    groups: dict[str, list[str]] = defaultdict(list)
    for peer in sorted(demands):
        if demands[peer] > 0:
            info = view.data_nodes[peer]
            groups[f"{info.region}|{info.compute_s!r}" if by_region else peer].append(peer)
    return [Commodity(key, peers, sum(demands[p] for p in peers), peers[0]) for key, peers in sorted(groups.items())]


def to_networkx(model: FlowModel, threshold: float | None = None) -> nx.DiGraph:
    """Single-commodity graph: 'S' -> commodities -> bundles (in/out, relay arcs) -> 'T'; integer weights (us).

    Relays inside a bundle become vertices ('r', peer) between the bundle's in and out vertices.
    Arcs between bundles costlier than `threshold` (seconds) are left out (bottleneck search).
    """
    g = nx.DiGraph()
    view = model.view
    for c, com in enumerate(model.commodities):
        g.add_edge("S", ("src", c), capacity=com.demand, weight=0)
        g.add_edge(("dst", c), "T", capacity=com.demand, weight=0)
    for i, bundle in enumerate(model.bundles):
        for peer in bundle.relays:
            relay = view.relays[peer]
            g.add_edge(("in", i), ("r", peer), capacity=relay.capacity, weight=_us(relay.compute_s))
            g.add_edge(("r", peer), ("out", i), capacity=relay.capacity, weight=0)
    for (i, j), cost in model.arcs.items():
        if threshold is None or cost <= threshold:
            g.add_edge(("out", i), ("in", j), weight=_us(cost))
    for (c, i), cost in model.sources.items():
        g.add_edge(("src", c), ("in", i), weight=_us(cost))
    for (i, c), cost in model.sinks.items():
        if threshold is None or cost <= threshold:
            g.add_edge(("out", i), ("dst", c), weight=_us(cost))
    return g


def _us(seconds: float) -> int:
    return int(round(seconds * COST_SCALE))


def networkx_min_cost_max_flow(model: FlowModel) -> tuple[int, int]:
    """(max flow, its min cost in microseconds) by networkx: the readable reference for tests."""
    g = to_networkx(model)
    flow = nx.max_flow_min_cost(g, "S", "T")
    return sum(flow["S"].values()), int(nx.cost_of_flow(g, flow))
