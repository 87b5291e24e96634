"""Simulator: random swarms from the region matrix, and discrete-event timing of an iteration (no tensors).

Topologies: nodes spread over 10 regions, compute time per microbatch drawn over a 4x range, capacities 1..4,
data nodes about 2 % of the nodes (at least one), each asking for a share of 1.1x the bottleneck stage's
capacity (so capacity binds). Everything is drawn from one seed.

Iteration timing: every microbatch goes forward along its path and back (backward costs twice the forward);
each relay computes one microbatch at a time (FIFO by arrival), each transfer costs latency + bytes / share of
bandwidth, where a link's bandwidth is shared evenly by the microbatches that cross it in the iteration.
Microbatches a plan leaves out run in further waves. Churn replaces relays between iterations: each relay leaves
with the given probability (so rates far below one relay per iteration still add up over iterations).

Callers' timing (what SWARM's balancer measures): for every forward hop into a relay, the time from the moment its
caller starts sending until the relay's output would be back at the caller (transfer in, queue, compute, transfer
out over the same link), handed to `observe(relay, seconds)` once the wave is done.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from gwtf.routing.base import DataInfo, Plan, RelayInfo, SwarmView
from gwtf.routing.cost import LinkModel, load_regions

ACTIVATION_BYTES = 8 * 2**20  # batch 8 x seq 512 x d 512 x fp32


@dataclass
class TopologyConfig:
    nodes: int
    stages: int = 10
    regions: int = 10
    compute_s: tuple[float, float] = (0.05, 0.2)  # a 4x spread
    capacity: tuple[int, int] = (1, 4)
    data_fraction: float = 0.02
    activation_bytes: int = ACTIVATION_BYTES

    def __post_init__(self) -> None:
        if self.nodes < self.stages + 1 or self.stages < 1 or not 1 <= self.regions <= len(load_regions().regions):
            raise ValueError("TopologyConfig: need nodes > stages >= 1 and 1 <= regions <= those in regions.json")


def random_topology(cfg: TopologyConfig, seed: int) -> tuple[SwarmView, dict[str, int]]:
    rng = random.Random(seed)
    regions = load_regions().regions[: cfg.regions]
    n_data = max(1, int(cfg.nodes * cfg.data_fraction))
    relays = {}
    for k in range(cfg.nodes - n_data):
        peer = f"r{k:05d}"
        relays[peer] = RelayInfo(
            peer, k % cfg.stages + 1, rng.randint(*cfg.capacity), rng.uniform(*cfg.compute_s), rng.choice(regions)
        )
    data = {f"d{k:04d}": DataInfo(f"d{k:04d}", rng.choice(regions), 0.02) for k in range(n_data)}
    view = SwarmView(cfg.stages, relays, data, cfg.activation_bytes, LinkModel())
    bottleneck = min(view.stage_capacity(s) for s in range(1, cfg.stages + 1))
    share = max(1, math.ceil(1.1 * bottleneck / n_data))
    return view, {d: share for d in data}


def churn(view: SwarmView, fraction: float, rng: random.Random, tag: str) -> SwarmView:
    """Each relay leaves with probability `fraction`; a newcomer of the same stage, in a random region, takes its
    place."""
    relays = dict(view.relays)
    regions = sorted({r.region for r in relays.values() if r.region is not None})
    leaving = [p for p in sorted(relays) if rng.random() < fraction]
    for n, peer in enumerate(leaving):
        old = relays.pop(peer)
        new = f"{tag}{n:05d}"
        relays[new] = RelayInfo(new, old.stage, rng.randint(1, 4), rng.uniform(0.05, 0.2), rng.choice(regions))
    return SwarmView(view.n_stages, relays, view.data_nodes, view.activation_bytes, view.links)


def crash(view: SwarmView, fraction: float, rng: random.Random) -> SwarmView:
    relays = dict(view.relays)
    for peer in rng.sample(sorted(relays), int(round(fraction * len(relays)))):
        del relays[peer]
    return SwarmView(view.n_stages, relays, view.data_nodes, view.activation_bytes, view.links)


Observe = Callable[[str, float], None]


def wave_time(view: SwarmView, plan: Plan, observe: Observe | None = None) -> float:
    """Discrete-event time of one wave: all planned microbatches forward then backward. `observe(relay, seconds)`:
    each forward call into a relay as its caller times it (module docstring)."""
    hops: list[tuple[str, list[str]]] = [(o, p) for o, paths in plan.items() for p in paths]
    if not hops:
        return 0.0
    crossings: Counter[tuple[str, str]] = Counter()
    for origin, path in hops:
        full = [origin, *path, origin]
        crossings.update(zip(full, full[1:]))
    free: dict[str, float] = {}
    # event: (time, seq, microbatch, position along forward+backward route)
    routes = []
    for origin, path in hops:
        forward = [origin, *path, origin]
        routes.append(forward + list(reversed(forward))[1:])
    events = [(0.0, i, i, 0) for i in range(len(routes))]
    heapq.heapify(events)
    end, seq = 0.0, len(routes)
    n_fwd = view.n_stages + 2
    sent_at: dict[tuple[int, int], float] = {}  # (microbatch, position) -> when its caller started sending
    calls: list[tuple[str, float]] = []

    def transfer(a: str, b: str, pair: tuple[str, str]) -> float:
        share = view.links.bandwidth_Bps(a, b) / max(1, crossings[pair])
        return view.links.latency_s(a, b) + view.activation_bytes / share

    while events:
        t, _, mb, pos = heapq.heappop(events)
        route = routes[mb]
        peer = route[pos]
        backward = pos >= n_fwd - 1
        work = view.compute_s(peer) * (2 if backward else 1)
        start = max(t, free.get(peer, 0.0))
        done = start + work
        free[peer] = done
        if 0 < pos < n_fwd - 1:  # a forward call into a relay: back at its caller one transfer after its output
            caller = route[pos - 1]
            calls.append((peer, done + transfer(peer, caller, (caller, peer)) - sent_at[(mb, pos)]))
        if pos + 1 == len(route):
            end = max(end, done)
            continue
        nxt = route[pos + 1]
        pair = (peer, nxt) if not backward else (nxt, peer)
        sent_at[(mb, pos + 1)] = done
        seq += 1
        heapq.heappush(events, (done + transfer(peer, nxt, pair), seq, mb, pos + 1))
    if observe is not None:
        for relay, seconds in calls:
            observe(relay, seconds)
    return end


def iteration_time(view: SwarmView, plan: Plan, demands: dict[str, int], observe: Observe | None = None) -> float:
    """Time for every data node to run its demanded microbatches: waves reuse the plan's paths. `observe`: as for
    `wave_time`."""
    left = dict(demands)
    total = 0.0
    while any(left.values()):
        wave = {o: plan.get(o, [])[: left[o]] for o in left}
        if not any(wave.values()):
            return math.inf  # some data node has demand and no path at all
        total += wave_time(view, wave, observe)
        left = {o: left[o] - len(wave[o]) for o in left}
    return total
