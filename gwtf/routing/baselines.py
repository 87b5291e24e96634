"""Baseline routers: round-robin over replicas; SWARM's balancer as SWARM has it (caller-side timing of whole calls,
bias-corrected EMA, earliest-expected-finish heap, new replicas first, failed ones banned); and the earlier
compute-time-only variant of it ("swarm-compute") for comparison."""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from collections.abc import Set as AbstractSet

from gwtf.routing.base import Plan, Router, SwarmView, validate_demands
from gwtf.routing.config import RoutingConfig

EWMA_ALPHA = 0.3  # swarm-compute: weight of a new measurement in its moving average
SWARM_EMA_ALPHA = 0.1  # SWARM's PerformanceEMA default alpha
BAN_S = 8.0  # how long a failed replica stays banned: the membership record TTL (gwtf.membership, record_ttl_s)
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


class PerformanceEMA:
    """Seconds per task as SWARM keeps them (yandex-research/swarm, swarm/pipeline/src/optim/performance_ema.py,
    `PerformanceEMA.update`): an exponential moving average with alpha 0.1 of interval / task_size, divided by
    1 - (1 - alpha) ** updates so that the first measurements are not pulled towards the zero it starts from."""

    def __init__(self, alpha: float = SWARM_EMA_ALPHA) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"PerformanceEMA alpha={alpha} must lie in (0, 1]")
        self.alpha, self.ema, self.updates = alpha, 0.0, 0

    def update(self, seconds: float, task_size: float = 1.0) -> None:
        if not (seconds >= 0 and task_size > 0 and math.isfinite(seconds)):
            return  # a bogus measurement must not poison the average
        self.ema = self.alpha * seconds / task_size + (1 - self.alpha) * self.ema
        self.updates += 1

    @property
    def seconds_per_task(self) -> float | None:
        """The bias-corrected estimate; None before the first measurement."""
        if not self.updates:
            return None
        return max(self.ema / (1 - (1 - self.alpha) ** self.updates), MIN_SECONDS)


class SwarmRouter(Router):
    """SWARM's balancer (yandex-research/swarm, swarm/pipeline/src/moe/client/balancer.py, `ExpertBalancer`), one
    per stage, shared by every microbatch this router plans:

    - a heap per stage of (virtual finish time, random tie-break, replica); each microbatch pops the smallest and
      pushes it back at that time + its expected seconds per microbatch (`use_another_expert`), so over time each
      replica gets work in proportion to its measured throughput;
    - the expected seconds are the bias-corrected EMA (`PerformanceEMA`, alpha 0.1) of whole calls timed at the
      caller (network + queue + compute: `update_threadsafe` around the remote call), fed through `observe`; before
      its first measurement a replica is expected to take `initial_s` (`initial_throughput * task_size`);
    - a replica seen for the first time enters at the heap's top key (`_add_expert`: "ensure that added experts are
      evaluated by placing them near the top of the queue"), so it is tried at once;
    - a replica whose call failed is banned (`_ban_expert`) until its membership record would expire (SWARM stores
      the ban with the record's expiration and re-adds only a newer record); a replica whose record is gone from
      the view is dropped (`use_another_expert`: "remove expired expert from queue").

    Where gwtf differs from SWARM's setting, and why: a relay holds a microbatch's activations until its backward,
    so the backward goes to the replica of the forward (SWARM's stateless experts let a backward go anywhere) and a
    replica at its capacity is skipped (it would refuse the call); only forward calls are dispatched and timed.
    Link costs are not given to it: they reach it only through the calls it times, as in SWARM.
    """

    name = "swarm"

    def __init__(
        self, seed: int = 0, routing: RoutingConfig | None = None, initial_s: float = 1.0, ban_s: float = BAN_S
    ) -> None:
        super().__init__(seed, routing)
        self.initial_s, self.ban_s = initial_s, ban_s
        self.clock = time.monotonic  # the simulator may set its own
        self.ema: dict[str, PerformanceEMA] = {}
        self.heaps: dict[int, list[tuple[float, float, str]]] = {}
        self.entry: dict[str, tuple[float, float, str]] = {}  # the live heap entry of each replica (lazy deletion)
        self.banned: dict[str, float] = {}  # replica -> clock time its ban ends

    # ---- what the caller measures ----------------------------------------------------------------------------------
    def observe(self, peer_id: str, seconds_per_microbatch: float) -> None:
        """A whole forward call to `peer_id` timed at the caller (network + queue + compute)."""
        if peer_id in self.entry:
            self.ema.setdefault(peer_id, PerformanceEMA()).update(seconds_per_microbatch)

    def ban(self, peer_id: str) -> None:
        """A call to `peer_id` failed: out of the heaps until its record would have expired."""
        self.banned[peer_id] = self.clock() + self.ban_s
        self.entry.pop(peer_id, None)
        self.ema.pop(peer_id, None)

    def expected_s(self, peer_id: str) -> float:
        ema = self.ema.get(peer_id)
        measured = ema.seconds_per_task if ema is not None else None
        return measured if measured is not None else self.initial_s

    # ---- the heaps -------------------------------------------------------------------------------------------------
    def _sync(self, view: SwarmView) -> None:
        """Drop replicas whose record is gone, add the new ones at the top of their stage's heap."""
        now = self.clock()
        self.banned = {p: t for p, t in self.banned.items() if t > now}
        for peer in [p for p in self.entry if p not in view.relays or view.relays[p].capacity <= 0]:
            del self.entry[peer]
            self.ema.pop(peer, None)
        for relay in sorted(view.relays.values(), key=lambda r: r.peer_id):
            if relay.peer_id in self.entry or relay.peer_id in self.banned or relay.capacity <= 0:
                continue
            heap = self.heaps.setdefault(relay.stage, [])
            self._clean(heap)
            entry = (heap[0][0] if heap else 0.0, self.rng.random(), relay.peer_id)
            heapq.heappush(heap, entry)
            self.entry[relay.peer_id] = entry

    def _clean(self, heap: list[tuple[float, float, str]]) -> None:
        while heap and self.entry.get(heap[0][2]) != heap[0]:
            heapq.heappop(heap)  # a banned, expired or re-keyed replica's stale entry

    def _pop(
        self,
        stage: int,
        view: SwarmView,
        load: Counter[str],
        exclude: AbstractSet[str] = frozenset(),
        aside: list[tuple[float, float, str]] | None = None,
    ) -> str | None:
        """The replica of `stage` with the earliest virtual finish that has room, pushed back one expected call
        later; None when every replica is full or excluded. `aside`: where a plan keeps the full replicas' entries
        until it ends (they stay full for the rest of it), instead of pushing them back after every pick: that
        re-push made a plan O(microbatches x replicas) heap operations per stage (4 s at N = 10,000), and since
        every entry's key is unique the picks are the same either way."""
        heap = self.heaps.get(stage, [])
        skipped: list[tuple[float, float, str]] = []
        pick = None
        while heap:
            entry = heapq.heappop(heap)
            peer = entry[2]
            if self.entry.get(peer) != entry:
                continue
            if peer in exclude or load[peer] >= view.relays[peer].capacity:
                (aside if aside is not None and peer not in exclude else skipped).append(entry)
                continue
            new = (entry[0] + self.expected_s(peer), self.rng.random(), peer)
            heapq.heappush(heap, new)
            self.entry[peer] = new
            load[peer] += 1
            pick = peer
            break
        for entry in skipped:
            heapq.heappush(heap, entry)  # full for this plan only: they keep their place
        return pick

    def plan(self, view: SwarmView, demands: dict[str, int]) -> Plan:
        validate_demands(view, demands)
        self._sync(view)
        load: Counter[str] = Counter()
        plan: Plan = {peer: [] for peer in demands}
        full: dict[int, list[tuple[float, float, str]]] = {s: [] for s in range(1, view.n_stages + 1)}
        try:
            for origin in _interleave(demands):
                path = []
                for s in range(1, view.n_stages + 1):
                    pick = self._pop(s, view, load, aside=full[s])
                    if pick is None:
                        return self._record(plan)  # a stage is full: no later microbatch fits either
                    path.append(pick)
                plan[origin].append(path)
            return self._record(plan)
        finally:
            for s, entries in full.items():  # full for this plan only: they keep their place
                for entry in entries:
                    heapq.heappush(self.heaps[s], entry)

    def reroute(self, view: SwarmView, path: list[str], stage: int, dead: set[str]) -> str | None:
        """A failed call bans its replica; the microbatch goes to the next replica off the heap."""
        if not 1 <= stage <= len(path):
            raise ValueError(f"stage {stage} outside path of {len(path)} stages")
        for peer in dead:
            if peer in view.relays or peer in self.entry:
                self.ban(peer)
        self._sync(view)
        pick = self._pop(stage, view, self.load, exclude=dead)
        if pick is None:  # every live replica is full: SWARM would queue the call there; the least loaded it is
            live = [r for r in view.replicas(stage) if r.peer_id not in dead and r.capacity > 0]
            if not live:
                return None
            pick = min(live, key=lambda r: (self.load[r.peer_id] / r.capacity, r.peer_id)).peer_id
            self.load[pick] += 1
        return pick


class SwarmComputeRouter(Router):
    """The earlier SWARM-like baseline, kept to show what the faithful one changes (router name "swarm-compute",
    used by gwtf.benchmarks.flow, not a run setting): expected finish = (microbatches queued there + 1) * EWMA
    (alpha 0.3) of each relay's self-reported compute time, one fresh heap per plan; blind to links and queues."""

    name = "swarm-compute"

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
