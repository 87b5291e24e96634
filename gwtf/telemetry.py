"""What a data node tells the people watching its run (`gwtf dashboard`, TensorBoard), and the routing's live gap.

`routing_gap(view, plan, demands)`: the microbatches a plan routes and its worst path against the optimum on the same
view (gwtf.routing.optimum, ortools). `Telemetry`: what a data node collects at the end of every iteration and
publishes through its membership (`Membership.publish_telemetry`), every size bounded:

    history   the last HISTORY iterations: loss, tokens/s, microbatches started/finished/re-routed/partial/lost
    flows     the last iteration's routes as directed links [src, dst, microbatches, cost] (origin -> stage replicas
              in visit order -> origin), each link's cost from the node's view (SwarmView.cost)
    plan      the router's paths for the iteration's first wave (one replica per stage, by stage) with the demand, so
              a watcher computes the gap on its own view of the same records
    versions  the node's state version and the relays' it knows first hand (their `stepped` replies; records lag a
              heartbeat), both as of the end of the last iteration
    gone      peers whose calls failed and that a probe then found gone (their records outlive them by a TTL)
    events    the last EVENTS re-routes, restarts, recoveries, peers found gone and stage rebuilds seen in records
    wire      bytes sent and received per message kind by the node's transport
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Any

from gwtf.membership import NodeRecord
from gwtf.routing.base import Plan, SwarmView
from gwtf.routing.optimum import solve_optimum, worst_path

HISTORY = 100  # iterations a data node publishes
EVENTS = 50  # events a data node publishes
MAX_LINKS = 512  # distinct links of one iteration's flows (a swarm larger than this publishes the busiest)
MAX_PATHS = 512  # distinct planned paths
MAX_PEERS = 1024  # relays in `versions`, peers in `gone`
TTL_S = 60.0  # a data node's telemetry outlives it by this long


def routing_gap(view: SwarmView, plan: Plan, demands: dict[str, int]) -> dict[str, float]:
    """How far `plan` (paths per data node, one replica per stage) is from the optimum for `demands` on `view`:
    throughput (microbatches routed) and worst path cost (seconds), each against the optimum's, and the gaps
    `1 - throughput / optimum` and `worst / optimum worst - 1` (0 where the optimum routes nothing)."""
    best = solve_optimum(view, demands)
    routed = sum(len(paths) for paths in plan.values())
    worst = worst_path(view, plan)
    return {
        "throughput": float(routed),
        "optimum_throughput": float(best.throughput),
        "worst_path": worst,
        "optimum_worst_path": best.worst_path,
        "throughput_gap": 1.0 - routed / best.throughput if best.throughput else 0.0,
        "worst_path_gap": worst / best.worst_path - 1.0 if best.worst_path > 0 and routed else 0.0,
    }


def route_links(origin: str, routes: Iterable[list[str]]) -> Counter[tuple[str, str]]:
    """Microbatches per directed link of `routes` (each in visit order), origin -> ... -> origin."""
    links: Counter[tuple[str, str]] = Counter()
    for route in routes:
        hops = [origin, *route, origin]
        links.update(zip(hops, hops[1:]))
    return links


def plan_from(paths: Iterable[list[str]]) -> list[list[Any]]:
    """Paths as [[path, count], ...], the busiest first (what a data node publishes as its plan)."""
    counts = Counter(tuple(p) for p in paths)
    return [[list(p), n] for p, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def plan_paths(published: Iterable[Any]) -> list[list[str]]:
    """A published plan ([[path, count], ...]) back into one path per microbatch; malformed entries are skipped."""
    paths: list[list[str]] = []
    for entry in published:
        if isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[1], int):
            path = entry[0]
            if isinstance(path, list | tuple) and all(isinstance(p, str) for p in path):
                paths += [list(path)] * max(0, min(entry[1], 1 << 16))
    return paths


class Telemetry:
    """One data node's telemetry: iterations and events in bounded windows, the last iteration's flows and plan."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS)
        self.flows: list[list[Any]] = []
        self.plan: list[list[Any]] = []
        self.demand = 0
        self.plan_iteration = -1
        self.versions: dict[str, int] = {}
        self.data_version = 0
        self.gone: dict[str, float] = {}  # peer -> wall time it was found gone
        self.suspects: set[str] = set()  # peers a call failed on, to probe
        self.rebuilds_seen: set[tuple[str, str]] = set()
        self.version = 0  # bumped on every change, so a publisher skips an unchanged payload
        self.finished = False

    # ---- what the data node feeds in ------------------------------------------------------------------------------
    def planned(self, iteration: int, paths: list[list[str]], demand: int) -> None:
        """The router's paths (by stage) for the iteration's first wave, and the microbatches asked for."""
        self.plan, self.demand, self.plan_iteration = plan_from(paths)[:MAX_PATHS], demand, iteration

    def iteration(self, report: Any, routes: list[list[str]], view: SwarmView, val_loss: float | None = None) -> None:
        """An iteration ended (`report`: gwtf.runtime.flights.IterationReport); `routes`: its microbatches' final
        routes in visit order; `view`: the swarm it was planned on, for the links' costs."""
        now = time.time()
        self.history.append(
            {
                "iteration": report.iteration,
                "time": now,
                "loss": report.loss,
                "val_loss": val_loss,
                "tokens_per_s": report.tokens / max(report.seconds, 1e-9),
                "seconds": report.seconds,
                **{k: getattr(report, k) for k in ("started", "finished", "rerouted", "partial", "lost")},
            }
        )
        links = route_links(self.peer_id, routes).most_common(MAX_LINKS)
        self.flows = [[a, b, n, view.cost(a, b)] for (a, b), n in links]
        self.version += 1

    def event(self, kind: str, text: str, **fields: Any) -> None:
        self.events.append({"time": time.time(), "kind": kind, "text": text, **fields})
        self.version += 1

    def flight_events(self, iteration: int, restarts: int, reroutes: int, recoveries: int) -> None:
        """What the iteration's microbatches went through: restarts (a dead hop before the forward came back),
        hops replaced on the way, stages recomputed after a replica died in the backward."""
        for kind, n, what in (
            ("restart", restarts, "microbatch restart(s)"),
            ("reroute", reroutes, "hop(s) re-routed"),
            ("recovery", recoveries, "stage(s) recomputed"),
        ):
            if n:
                self.event(kind, f"{n} {what}", iteration=iteration, count=n)

    def suspect(self, peer: str) -> None:
        if peer not in self.gone and len(self.suspects) < MAX_PEERS:
            self.suspects.add(peer)

    def found_gone(self, peers: Iterable[str], stage_of: Mapping[str, int] | None = None) -> None:
        for peer in peers:
            self.suspects.discard(peer)
            if peer in self.gone:
                continue
            if len(self.gone) >= MAX_PEERS:
                del self.gone[min(self.gone, key=self.gone.__getitem__)]
            self.gone[peer] = time.time()
            stage = (stage_of or {}).get(peer)
            where = f" (stage {stage})" if stage is not None else ""
            self.event("gone", f"{peer[-8:]}{where} found gone by probe", peer=peer, stage=stage)

    def rebuilds(self, records: Mapping[str, NodeRecord]) -> None:
        """Stage rebuilds the relays' records say they went through (`NodeRecord.rebuilt_from`), each once."""
        for peer, rec in records.items():
            key = (peer, rec.rebuilt_from)
            if key[1] and key not in self.rebuilds_seen and len(self.rebuilds_seen) < MAX_PEERS:
                self.rebuilds_seen.add(key)
                text = f"stage {rec.stage} rebuilt by {peer[-8:]}: {key[1]}"
                self.event("rebuild", text, peer=peer, stage=rec.stage, rebuilt_from=key[1])

    def set_versions(self, own: int, relays: Mapping[str, int]) -> None:
        """The node's own state version and the relays' it knows first hand, as of the same moment (the end of an
        iteration), so a watcher compares the relays with the run's version consistently."""
        self.data_version = own
        self.versions = dict(sorted(relays.items(), key=lambda kv: -kv[1])[:MAX_PEERS])

    # ---- what it publishes ------------------------------------------------------------------------------------------
    def payload(self, wire: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
        """The dict published (msgpack- and JSON-friendly: str keys, lists, numbers, None)."""
        return {
            "peer_id": self.peer_id,
            "time": time.time(),
            "version": self.data_version,
            "finished": self.finished,
            "history": list(self.history),
            "flows": self.flows,
            "plan": self.plan,
            "demand": self.demand,
            "plan_iteration": self.plan_iteration,
            "versions": self.versions,
            "gone": sorted(self.gone),
            "events": list(self.events),
            "wire": {direction: dict(counts) for direction, counts in wire.items()},
        }
