"""Baseline routers: round-robin over replicas, and SWARM's earliest-expected-finish choice."""

from __future__ import annotations

import heapq
from collections import Counter

from gwtf.routing.base import Plan, Router, SwarmView, validate_demands
from gwtf.routing.config import RoutingConfig

EWMA_ALPHA = 0.3  # weight of a new measurement in SWARM's moving average
MIN_SECONDS = 1e-6


def _interleave(demands: dict[str, int]) -> list[str]:
    """Data nodes in turn, one microbatch each, so no data node is starved when capacity runs short."""
    order: list[str] = []
    left = dict(sorted(demands.items()))
    while any(left.values()):
        for peer in list(left):
            if left[peer] > 0:
                order.append(peer)
                left[peer] -= 1
    return order


class RoundRobinRouter(Router):
    """Each stage hands microbatches to its replicas in turn, skipping full ones; ignores cost and speed."""

    name = "round-robin"

    def plan(self, view: SwarmView, demands: dict[str, int]) -> Plan:
        validate_demands(view, demands)
        stages = [view.replicas(s) for s in range(1, view.n_stages + 1)]
        cursor = [0] * view.n_stages
        load: Counter[str] = Counter()
        plan: Plan = {peer: [] for peer in demands}
        for origin in _interleave(demands):
            path = []
            for s, replicas in enumerate(stages):
                pick = self._next_free(replicas, cursor, s, load)
                if pick is None:
                    return self._record(plan)  # a stage is full: no later microbatch fits either
                path.append(pick)
            load.update(path)
            plan[origin].append(path)
        return self._record(plan)

    @staticmethod
    def _next_free(replicas: list, cursor: list[int], s: int, load: Counter[str]) -> str | None:
        for _ in range(len(replicas)):
            relay = replicas[cursor[s] % len(replicas)]
            cursor[s] += 1
            if load[relay.peer_id] < relay.capacity:
                return relay.peer_id
        return None


class SwarmRouter(Router):
    """SWARM: each microbatch goes, stage by stage, to the replica expected to finish it first.

    Expected finish = (microbatches queued there + 1) * moving average of its measured seconds per microbatch
    (its advertised compute time until measured), kept in one heap per stage. Link costs are not considered,
    as in SWARM, except through what the measurements include.
    """

    name = "swarm"

    def __init__(self, seed: int = 0, routing: RoutingConfig | None = None) -> None:
        super().__init__(seed, routing)
        self.speed: dict[str, float] = {}

    def observe(self, peer_id: str, seconds_per_microbatch: float) -> None:
        if not seconds_per_microbatch > 0:
            return  # a bogus measurement must not poison the average
        old = self.speed.get(peer_id)
        self.speed[peer_id] = (
            seconds_per_microbatch if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * seconds_per_microbatch
        )

    def _seconds(self, view: SwarmView, peer: str) -> float:
        return max(self.speed.get(peer, view.compute_s(peer)), MIN_SECONDS)

    def plan(self, view: SwarmView, demands: dict[str, int]) -> Plan:
        validate_demands(view, demands)
        heaps = []
        for s in range(1, view.n_stages + 1):
            heap = [(self._seconds(view, r.peer_id), r.peer_id) for r in view.replicas(s) if r.capacity > 0]
            heapq.heapify(heap)
            heaps.append(heap)
        load: Counter[str] = Counter()
        plan: Plan = {peer: [] for peer in demands}
        for origin in _interleave(demands):
            if any(not heap for heap in heaps):
                break
            path = [self._pop(view, heap, load) for heap in heaps]
            plan[origin].append(path)
        return self._record(plan)

    def _pop(self, view: SwarmView, heap: list[tuple[float, str]], load: Counter[str]) -> str:
        _, peer = heapq.heappop(heap)
        load[peer] += 1
        if load[peer] < view.relays[peer].capacity:
            heapq.heappush(heap, ((load[peer] + 1) * self._seconds(view, peer), peer))
        return peer

    def reroute(self, view: SwarmView, path: list[str], stage: int, dead: set[str]) -> str | None:
        live = [r for r in view.replicas(stage) if r.peer_id not in dead and r.capacity > 0]
        if not live:
            return None

        def finish(relay) -> tuple[int, float, str]:
            full = self.load[relay.peer_id] >= relay.capacity
            return (int(full), (self.load[relay.peer_id] + 1) * self._seconds(view, relay.peer_id), relay.peer_id)

        pick = min(live, key=finish).peer_id
        self.load[pick] += 1
        return pick
