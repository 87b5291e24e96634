"""How much routing alone can gain on a harness scenario: every router's plan timed in the simulator, the best plan a
local search finds, and lower bounds no plan can beat.

    python -m gwtf.benchmarks.plan_bounds --scenario benchmarks/scenarios/geo10.toml [--capacity 6] --json OUT

The scenario's starting swarm is turned into the view the runtime's routers see (compute_ms / speed per relay, the
scenario's capacities and regions, the preset's activation size, the data nodes' region) and every router plans one
iteration of the scenario's microbatches. `gwtf.routing.simulator.iteration_time` times each plan (relays compute
one microbatch at a time, links share bandwidth), mean over `--seeds` router seeds. Then:
- `objective_best`: the same search on GWTF's own objective (worst path cost d, then total cost), timed: what
  an agent that reached its objective's optimum would get;
- `congestion_objective_best`: the same on that objective with each relay's compute paid once per microbatch it
  holds and each link's transfer once per microbatch crossing it (`congestion_objective`), timed: what an agent
  that advertised that cost would get at best;
- `search_best`: hill climbing on the simulated iteration time from every router's plan and from random plans, moving
  one microbatch's hop at one stage to another replica with room or exchanging it with another microbatch's: the
  best plan found, an upper bound on what the best router could reach;
- `lower_bound`: the larger of (a) the fastest single route, forward and backward with no queueing and no shared
  bandwidth, and (b) per stage, the best split of the microbatches over its replicas of (earliest arrival +
  3 x compute x microbatches + fastest way home; uncapped where the stage cannot hold them all and the plan
  runs in waves): every plan's iteration time is at least this.
Ratios are against SWARM's plan in the same run; below 1 is faster than SWARM. SWARM's balancer learns from the
calls it times: each router plans `WARMUP` iterations first, told of every call the simulator times, and its last
plan is the one timed (routers that do not learn plan the same each time). Churn and crash handling are not in these
numbers: they bound what the choice of routes can do on a swarm of this shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gwtf.benchmarks.harness.scenario import Scenario, load_scenario
from gwtf.errors import UserError
from gwtf.routing.agent import AgentConfig
from gwtf.routing.base import DataInfo, Plan, RelayInfo, Router, SwarmView
from gwtf.routing.gwtf_router import GWTFRouter
from gwtf.routing.registry import make_router
from gwtf.routing.simulator import TopologyConfig, iteration_time, random_topology

ROUTERS = ("round-robin", "swarm", "gwtf", "oracle")
WARMUP = 10  # iterations a router plans, and hears the simulated calls of, before the plan that is timed


@dataclass
class Problem:
    view: SwarmView
    demands: dict[str, int]

    @property
    def stages(self) -> list[list[str]]:
        return [[r.peer_id for r in self.view.replicas(s)] for s in range(1, self.view.n_stages + 1)]

    def time(self, plan: Plan) -> float:
        return iteration_time(self.view, plan, self.demands)


def scenario_problem(sc: Scenario, capacity: int | None = None) -> Problem:
    """The scenario's starting swarm as the routers see it, and one iteration's microbatches."""
    from gwtf.config import load_config
    from gwtf.runtime.views import activation_bytes

    cfg = load_config(None, [f"preset={sc.preset}", f"stages={sc.stages}", *sc.overrides])
    model, t = cfg.model_config(), cfg.train
    relays: dict[str, RelayInfo] = {}
    for spec in sc.nodes:
        for _ in range(spec.count):
            peer = f"r{len(relays):03d}"
            stage = spec.stage if spec.stage is not None else len(relays) % sc.stages + 1
            compute = max(sc.compute_ms / 1000 / spec.speed, 1e-4)
            relays[peer] = RelayInfo(peer, stage, capacity or spec.capacity, compute, spec.region)
    data = {f"d{k}": DataInfo(f"d{k}", sc.data_region) for k in range(sc.data_nodes)}
    view = SwarmView(sc.stages, relays, data, activation_bytes(model, t.microbatch_size))
    share = t.microbatches_per_step // sc.data_nodes
    return Problem(view, dict.fromkeys(data, share))


# ---------------------------------------------------------------------------------------------------------------
# lower bounds


def lower_bound(p: Problem) -> dict[str, float]:
    view, links = p.view, p.view.links
    size = view.activation_bytes

    def hop(a: str, b: str) -> float:
        return links.latency_s(a, b) + size / links.bandwidth_Bps(a, b)

    def best_route(origin: str, layers: list[list[str]], end: str | None, back: bool) -> float:
        """Cheapest origin -> one relay per layer (-> end): forward compute once, or backward twice, per relay."""
        best = {origin: 0.0}
        for layer in layers:
            best = {q: min(v + (hop(q, p) if back else hop(p, q)) for p, v in best.items()) for q in layer}
            best = {q: v + view.compute_s(q) * (2 if back else 1) for q, v in best.items()}
        if end is None:
            return min(best.values())
        return min(v + (hop(end, q) if back else hop(q, end)) for q, v in best.items())

    stages = p.stages
    route = min(
        best_route(d, stages, d, back=False) + best_route(d, stages, d, back=True) for d in p.demands if p.demands[d]
    )
    stage_lb = 0.0
    total = sum(p.demands.values())
    for s, replicas in enumerate(stages):
        bounds = {}
        for r in replicas:
            c = view.compute_s(r)
            head = min(best_route(d, stages[:s], r, back=False) for d in p.demands)  # arrival, before its own work
            tail = min(best_route(d, stages[:s], r, back=True) for d in p.demands)  # its gradient's way home
            bounds[r] = (head, 3 * c, tail)
        caps = {r: view.relays[r].capacity for r in replicas}
        if sum(caps.values()) < total:  # the plan runs in waves: a relay still computes all it gets one at a time
            caps = dict.fromkeys(replicas, total)
        stage_lb = max(stage_lb, _split_bound(bounds, caps, total))
    return {"route": route, "stage": stage_lb, "lower_bound": max(route, stage_lb)}


def _split_bound(bounds: dict[str, tuple[float, float, float]], caps: dict[str, int], total: int) -> float:
    """min over splits of `total` microbatches (within capacities) of max over relays of head + n x work + tail:
    a binary search on the makespan, each relay taking as many as fit."""
    values = sorted(
        {h + n * w + t for r, (h, w, t) in bounds.items() for n in range(1, min(caps[r], total) + 1)} | {0.0}
    )
    for v in values:
        fits = sum(
            min(caps[r], int((v - h - t) / w + 1e-9)) if v >= h + w + t else 0 for r, (h, w, t) in bounds.items()
        )
        if fits >= total:
            return v
    return float("inf")  # the stage cannot hold the microbatches at all


# ---------------------------------------------------------------------------------------------------------------
# local search


def _flatten(plan: Plan) -> list[tuple[str, list[str]]]:
    return [(o, list(path)) for o, paths in sorted(plan.items()) for path in paths]


def _unflatten(routes: list[tuple[str, list[str]]]) -> Plan:
    plan: Plan = {}
    for o, path in routes:
        plan.setdefault(o, []).append(list(path))
    return plan


def search(
    p: Problem, starts: list[Plan], rng: random.Random, restarts: int, max_evals: int, score=None
) -> tuple[float, Plan]:
    """Hill climbing over one-hop moves and exchanges (capacities kept) from each start and random plans, on
    `score` (default: the simulated iteration time)."""
    starts = list(starts) + [random_plan(p, rng) for _ in range(restarts)]
    best_t, best = float("inf"), starts[0]
    for start in starts:
        t, plan = _climb(p, _flatten(start), rng, max_evals, score or p.time)
        if t < best_t:
            best_t, best = t, plan
    return best_t, best


def random_plan(p: Problem, rng: random.Random) -> Plan:
    load: dict[str, int] = {}
    routes: list[tuple[str, list[str]]] = []
    for origin, n in sorted(p.demands.items()):
        for _ in range(n):
            path = []
            for replicas in p.stages:
                room = [r for r in replicas if load.get(r, 0) < p.view.relays[r].capacity]
                if not room:
                    return _unflatten(routes)
                pick = rng.choice(room)
                load[pick] = load.get(pick, 0) + 1
                path.append(pick)
            routes.append((origin, path))
    return _unflatten(routes)


def gwtf_objective(p: Problem):
    """GWTF's own objective (design.md section 5): the worst path cost d, then the total (as a small tie-break)."""

    def score(plan: Plan) -> float:
        costs = [p.view.path_cost(o, path) for o, paths in plan.items() for path in paths]
        return max(costs, default=0.0) + 1e-3 * sum(costs)

    return score


def congestion_objective(p: Problem):
    """GWTF's objective on a cost that counts what the microbatches of one plan do to each other (a variant proposed
    for the agents, not what they run): each relay's compute is paid once per microbatch it holds (it computes them
    one at a time) and each link's transfer term is multiplied by the microbatches that cross it (they share its
    bandwidth), as `gwtf.routing.simulator` times an iteration. A relay knows both figures for its own slots and
    out-links, so an agent could advertise this cost-to-sink as it advertises d today."""
    view, links, size = p.view, p.view.links, p.view.activation_bytes

    def link(a: str, b: str, sharing: int) -> float:
        lat = (links.latency_s(a, b) + links.latency_s(b, a)) / 2
        return lat + 2 * size * sharing / (links.bandwidth_Bps(a, b) + links.bandwidth_Bps(b, a))

    def score(plan: Plan) -> float:
        routes = [[o, *path, o] for o, paths in plan.items() for path in paths]
        load: dict[str, int] = {}
        crossings: dict[tuple[str, str], int] = {}
        for route in routes:
            for r in route[1:-1]:
                load[r] = load.get(r, 0) + 1
            for pair in zip(route, route[1:]):
                crossings[pair] = crossings.get(pair, 0) + 1
        costs = [
            view.compute_s(route[0])
            + sum(view.compute_s(r) * load[r] for r in route[1:-1])
            + sum(link(a, b, crossings[(a, b)]) for a, b in zip(route, route[1:]))
            for route in routes
        ]
        return max(costs, default=0.0) + 1e-3 * sum(costs)

    return score


def _climb(p: Problem, routes: list[tuple[str, list[str]]], rng: random.Random, max_evals: int, score):
    cur = score(_unflatten(routes))
    evals = 0
    improved = True
    while improved and evals < max_evals:
        improved = False
        moves = list(_neighbours(p, routes))
        rng.shuffle(moves)
        for move in moves:
            cand = move()
            t = score(_unflatten(cand))
            evals += 1
            if t < cur - 1e-9:
                routes, cur, improved = cand, t, True
                break
            if evals >= max_evals:
                break
    return cur, _unflatten(routes)


def _neighbours(p: Problem, routes: list[tuple[str, list[str]]]):
    load: dict[str, int] = {}
    for _, path in routes:
        for r in path:
            load[r] = load.get(r, 0) + 1
    for s, replicas in enumerate(p.stages):
        for i, (_, path) in enumerate(routes):
            for r in replicas:  # move microbatch i's stage-s hop to a replica with room
                if r != path[s] and load.get(r, 0) < p.view.relays[r].capacity:
                    yield _replace(routes, [(i, s, r)])
        for i, j in itertools.combinations(range(len(routes)), 2):  # exchange two microbatches' stage-s hops
            a, b = routes[i][1][s], routes[j][1][s]
            if a != b:
                yield _replace(routes, [(i, s, b), (j, s, a)])


def _replace(routes, changes):
    def build():
        out = [(o, list(path)) for o, path in routes]
        for i, s, r in changes:
            out[i][1][s] = r
        return out

    return build


# ---------------------------------------------------------------------------------------------------------------


def _maker(name: str) -> Callable[[int], Router]:
    return lambda seed: make_router(name, seed)


def warmed_plan(p: Problem, router: Router) -> Plan:
    """The router's plan after `WARMUP` iterations in which it heard every call the simulator timed."""
    for _ in range(WARMUP):
        iteration_time(p.view, router.plan(p.view, p.demands), p.demands, observe=router.observe)
    return router.plan(p.view, p.demands)


def topology_problem(nodes: int, stages: int, seed: int) -> Problem:
    """The swarm `gwtf.benchmarks.flow` times at `--nodes` (gwtf.routing.simulator.random_topology, the same seed
    gives the same swarm): its data nodes ask for 1.1x the bottleneck stage's slots, so every plan runs in waves."""
    view, demands = random_topology(TopologyConfig(nodes=nodes, stages=stages), seed)
    return Problem(view, demands)


def agent_variant(spec: str) -> tuple[str, Callable[[int], Router]]:
    """`key=value,...` of gwtf.routing.agent.AgentConfig fields (and `rounds`): a GWTF router with those settings,
    named `gwtf[spec]`, to see which of the agent's options close the gap to its objective's optimum."""
    fields = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(AgentConfig)}
    kw: dict[str, Any] = {}
    rounds = 40
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key == "rounds":
            rounds = int(value)
        elif key in fields:
            kind = {"bool": lambda v: v.lower() in ("1", "true", "yes"), "int": int, "float": float}.get(
                fields[key], str
            )
            kw[key] = kind(value)
        else:
            raise UserError(f"--agent-variant: {key!r} is not an AgentConfig field (nor rounds)")
    cfg = AgentConfig(**kw)
    return f"gwtf[{spec}]", lambda seed: GWTFRouter(seed, rounds=rounds, cfg=cfg)


def run(
    sc: Scenario, capacity: int | None, seeds: int, restarts: int, max_evals: int, variants: tuple[str, ...] = ()
) -> dict:
    row = run_problem(scenario_problem(sc, capacity), seeds, restarts, max_evals, variants)
    return {"scenario": sc.name, "capacity_override": capacity, **row}


def run_problem(p: Problem, seeds: int, restarts: int, max_evals: int, variants: tuple[str, ...] = ()) -> dict:
    times: dict[str, float] = {}
    plans: list[Plan] = []
    routers: list[tuple[str, Callable[[int], Router]]] = [(name, _maker(name)) for name in ROUTERS]
    routers += [agent_variant(spec) for spec in variants]
    for name, make in routers:
        per_seed = []
        for seed in range(seeds):
            plan = warmed_plan(p, make(seed))
            per_seed.append(p.time(plan))
            plans.append(plan)
        times[name] = statistics.fmean(per_seed)
    best_t, _ = search(p, plans, random.Random(0), restarts, max_evals)
    _, objective_plan = search(p, plans, random.Random(1), restarts, max_evals, gwtf_objective(p))
    times["objective_best"] = p.time(objective_plan)
    _, congestion_plan = search(p, plans, random.Random(2), restarts, max_evals, congestion_objective(p))
    times["congestion_objective_best"] = p.time(congestion_plan)
    bounds = lower_bound(p)
    swarm = times["swarm"]
    return {
        "microbatches": sum(p.demands.values()),
        "slots_per_stage": [sum(p.view.relays[r].capacity for r in reps) for reps in p.stages],
        "iteration_s": {**times, "search_best": best_t, **bounds},
        "vs_swarm": {
            k: v / swarm for k, v in {**times, "search_best": best_t, "lower_bound": bounds["lower_bound"]}.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", default=[], help="scenario TOML (repeatable)")
    parser.add_argument(
        "--nodes", type=int, default=None, help="instead: gwtf.benchmarks.flow's random swarm of N nodes"
    )
    parser.add_argument("--stages", type=int, default=10, help="with --nodes: pipeline stages")
    parser.add_argument("--topologies", type=int, default=1, help="with --nodes: topology seeds 0..T-1")
    parser.add_argument(
        "--capacity", type=int, action="append", default=None, help="every relay's capacity (repeatable)"
    )
    parser.add_argument("--seeds", type=int, default=5, help="router seeds to average")
    parser.add_argument("--restarts", type=int, default=10, help="random starting plans for the search")
    parser.add_argument("--max-evals", type=int, default=3000, help="simulated plans per climb")
    parser.add_argument(
        "--agent-variant",
        action="append",
        default=[],
        help="also a GWTF router with these AgentConfig settings, e.g. exchange=1,takeover=1 or rounds=120",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    variants = tuple(args.agent_variant)
    if bool(args.scenario) == (args.nodes is not None):
        parser.error("give --scenario (one or more) or --nodes")
    rows = []
    for topology in range(args.topologies if args.nodes is not None else 0):
        row = run_problem(topology_problem(args.nodes, args.stages, topology), args.seeds, args.restarts,
                          args.max_evals, variants)  # fmt: skip
        rows.append({"nodes": args.nodes, "stages": args.stages, "topology_seed": topology, **row})
        figures = "  ".join(f"{k} {v:.3f}" for k, v in row["vs_swarm"].items())
        print(f"nodes={args.nodes} topology={topology} microbatches={row['microbatches']}  vs SWARM: {figures}",
              flush=True)  # fmt: skip
    for path in args.scenario:
        sc = load_scenario(path)
        for cap in args.capacity or [None]:
            row = run(sc, cap, args.seeds, args.restarts, args.max_evals, variants)
            rows.append(row)
            figures = "  ".join(f"{k} {v:.3f}" for k, v in row["vs_swarm"].items())
            print(f"{sc.name} capacity={cap or 'scenario'} slots/stage={row['slots_per_stage']} "
                  f"microbatches={row['microbatches']}  vs SWARM: {figures}", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
