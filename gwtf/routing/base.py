"""The router interface the runtime uses (plan, reroute, and a lifecycle with its node) and the swarm view it routes
over. Routers by name: gwtf.routing.registry."""

from __future__ import annotations

import logging
import random
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gwtf.routing.config import RoutingConfig
from gwtf.routing.cost import LinkModel

logger = logging.getLogger(__name__)

Plan = dict[str, list[list[str]]]


@dataclass(frozen=True)
class RelayInfo:
    """A relay as its membership record describes it. capacity: microbatches it can hold in one iteration."""

    peer_id: str
    stage: int
    capacity: int
    compute_s: float
    region: str | None = None

    def __post_init__(self) -> None:
        if self.stage < 1 or self.capacity < 0 or not self.compute_s >= 0:
            raise ValueError(f"relay {self.peer_id}: need stage >= 1, capacity >= 0, compute_s >= 0")


@dataclass(frozen=True)
class DataInfo:
    """A data node (stage 0, source and sink of its own microbatches)."""

    peer_id: str
    region: str | None = None
    compute_s: float = 0.0


@dataclass
class SwarmView:
    """What a router knows of the swarm: relays, data nodes, activation size and link figures."""

    n_stages: int
    relays: dict[str, RelayInfo]
    data_nodes: dict[str, DataInfo]
    activation_bytes: int
    links: LinkModel = field(default_factory=LinkModel)

    def __post_init__(self) -> None:
        if self.n_stages < 1 or self.activation_bytes < 0:
            raise ValueError("SwarmView needs n_stages >= 1 and activation_bytes >= 0")
        for relay in self.relays.values():
            if relay.stage > self.n_stages:
                raise ValueError(f"relay {relay.peer_id} has stage {relay.stage} > n_stages {self.n_stages}")
            self.links.set_region(relay.peer_id, relay.region)
        for data in self.data_nodes.values():
            self.links.set_region(data.peer_id, data.region)

    def replicas(self, stage: int) -> list[RelayInfo]:
        """Replicas of a stage in a fixed (sorted) order, so routers are deterministic."""
        return sorted((r for r in self.relays.values() if r.stage == stage), key=lambda r: r.peer_id)

    def compute_s(self, peer: str) -> float:
        info = self.relays.get(peer) or self.data_nodes.get(peer)
        return info.compute_s if info is not None else 0.0

    def cost(self, a: str, b: str) -> float:
        """d_ab of design.md section 5."""
        half = (self.compute_s(a) + self.compute_s(b)) / 2
        return half + self.links.link_term(a, b, self.activation_bytes)

    def path_cost(self, origin: str, path: list[str]) -> float:
        """Cost of origin -> path[0] -> ... -> path[-1] -> origin."""
        hops = [origin, *path, origin]
        return sum(self.cost(a, b) for a, b in zip(hops, hops[1:]))

    def stage_capacity(self, stage: int) -> int:
        return sum(r.capacity for r in self.relays.values() if r.stage == stage)


class RoutedNode(Protocol):
    """What a router uses of the node it runs in (gwtf.runtime.node.NodeBase): exactly what router gwtf-p2p's
    AgentService and P2PRouter.start use (gwtf.routing.p2p); the routers that only plan use none of it."""

    peer_id: str
    spec: Any  # gwtf.runtime.spec.RunSpec: spec.model.n_stages
    transport: Any  # gwtf.transport.Transport: transport.add_handler(name, handler) for the agent's messages
    run: Any  # gwtf.config.RunConfig: run.transport.call_timeout, run.membership.heartbeat_s
    closed: bool  # the agent's rounds and record refreshes stop when the node closes

    async def call(self, peer: str, name: str, msg: Any, timeout: float | None = None) -> Any:
        """A bounded call of handler `name` on `peer` (PeerError when it fails)."""
        ...

    def message(self, kind: str, **kw: Any) -> Any:
        """A gwtf.transport.Message of this node's run."""
        ...

    async def live_nodes(self, max_age: float | None = None) -> dict[str, Any]:
        """The live DHT records by peer (gwtf.membership.NodeRecord, of which the agent reads `room`), cached for
        `max_age` seconds."""
        ...


class Router(ABC):
    """Chooses, for each data node, one path (a replica of every stage) per microbatch."""

    name: str = "abstract"

    def __init__(self, seed: int = 0, routing: RoutingConfig | None = None) -> None:
        self.seed = seed
        self.routing = routing or RoutingConfig()  # the run's routing settings
        self.rng = random.Random(seed)
        self.load: Counter[str] = Counter()  # microbatches per relay in the last plan

    @abstractmethod
    def plan(self, view: SwarmView, demands: dict[str, int]) -> Plan:
        """For each data node, one path per microbatch; never more microbatches on a relay than its capacity."""

    def reroute(self, view: SwarmView, path: list[str], stage: int, dead: set[str]) -> str | None:
        """A live replica of `stage` (1-based) to replace path[stage-1]: spare capacity first, then lowest cost."""
        if not 1 <= stage <= len(path):
            raise ValueError(f"stage {stage} outside path of {len(path)} stages")
        prev = path[stage - 2] if stage >= 2 else None
        nxt = path[stage] if stage < len(path) else None
        best: tuple[tuple[int, float, str], str] | None = None
        for relay in view.replicas(stage):
            if relay.peer_id in dead or relay.capacity <= 0:
                continue
            spare = relay.capacity - self.load[relay.peer_id]
            cost = sum(view.cost(p, relay.peer_id) for p in (prev, nxt) if p is not None and p not in dead)
            key = (0 if spare > 0 else 1, cost, relay.peer_id)
            if best is None or key < best[0]:
                best = (key, relay.peer_id)
        if best is None:
            return None
        self.load[best[1]] += 1
        return best[1]

    # ---- lifecycle: a router starts with its node and closes with it ---------------------------------------------
    async def start(self, node: RoutedNode, stage: int, views: Callable[[dict], SwarmView], units: int = 0) -> None:
        """The node (of `stage`; a data node is stage 0 with `units` microbatches per iteration) starts serving.
        `views(records)`: the swarm of every serving node. Routers that only plan do nothing here."""
        return None

    async def close(self) -> None:
        return None

    def room(self) -> int:
        """The microbatch slots this node's router has left, for its DHT record (-1: it does not say)."""
        return -1

    def observe(self, peer_id: str, seconds_per_microbatch: float) -> None:
        """A measured speed; routers that do not use it ignore it."""
        return None

    def _record(self, plan: Plan) -> Plan:
        self.load = Counter(peer for paths in plan.values() for path in paths for peer in path)
        return plan


def validate_demands(view: SwarmView, demands: dict[str, int]) -> None:
    for peer, count in demands.items():
        if peer not in view.data_nodes:
            raise ValueError(f"demand for {peer}, which is not a data node of the view")
        if count < 0:
            raise ValueError(f"negative demand {count} for {peer}")
