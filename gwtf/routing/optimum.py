"""The yardstick: optimal routing computed with ortools on the global view, and the oracle router.

Objective, in order: the most microbatches per iteration, then the lowest worst path cost, then the lowest
total cost.
- One commodity (one data node, or interchangeable ones): exact min-cost max-flow (SimpleMinCostFlow).
- Several: the multi-commodity LP (GLOP) is the upper bound on throughput and the lower bound on total cost;
  the integer program (SCIP) on the same bundle graph gives an exact integral routing.
- Worst path: a bottleneck search over link costs (the smallest cap on inter-bundle link terms that keeps the
  maximum throughput), then min cost under that cap, decomposed into paths pairing expensive prefixes with cheap
  continuations. The result is an achievable worst path, not a certified min-max (that problem is NP-hard in
  general); `worst_path_lower_bound` (the mean path cost of the min-cost flow) brackets it from below.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from ortools.graph.python import min_cost_flow
from ortools.linear_solver import pywraplp

from gwtf.routing.base import Plan, Router, SwarmView, validate_demands
from gwtf.routing.graph import COST_SCALE, FlowModel, build_model, to_networkx

logger = logging.getLogger(__name__)

MIP_TIME_LIMIT_MS = 60_000


@dataclass
class FlowSolution:
    """Flows on the bundle graph: per relay (y), per commodity on arcs (z), sources and sinks."""

    throughput: float
    cost: float  # seconds, summed over microbatches
    y: dict[str, float] = field(default_factory=dict)
    z: dict[tuple[int, int, int], float] = field(default_factory=dict)  # (commodity, bundle, next bundle)
    src: dict[tuple[int, int], float] = field(default_factory=dict)  # (commodity, bundle)
    snk: dict[tuple[int, int], float] = field(default_factory=dict)  # (bundle, commodity)


@dataclass
class Optimum:
    throughput: int  # microbatches per iteration, integral optimum
    lp_throughput: float  # multi-commodity LP upper bound
    total_cost: float  # of the plan below
    lp_total_cost: float  # lower bound on total cost at maximum throughput
    worst_path: float  # worst path of the plan below (achievable)
    worst_path_lower_bound: float
    plan: Plan


# ----------------------------------------------------------------------------------------------- one commodity


def min_cost_max_flow(model: FlowModel, threshold: float | None = None) -> FlowSolution:
    """Exact min-cost max-flow with ortools on the networkx graph of the model (one commodity)."""
    g = to_networkx(model, threshold)
    index = {v: k for k, v in enumerate(g.nodes)}
    big = max(model.demand, 1)
    smcf = min_cost_flow.SimpleMinCostFlow()
    edges = list(g.edges(data=True))
    for u, v, data in edges:
        smcf.add_arc_with_capacity_and_unit_cost(index[u], index[v], int(data.get("capacity", big)), data["weight"])
    # solve_max_flow_with_min_cost needs supplies set: the whole demand offered at S, asked at T.
    smcf.set_node_supply(index["S"], model.demand)
    smcf.set_node_supply(index["T"], -model.demand)
    status = smcf.solve_max_flow_with_min_cost()
    if status != smcf.OPTIMAL:
        raise RuntimeError(f"min-cost flow failed with status {status}")
    sol = FlowSolution(throughput=float(smcf.maximum_flow()), cost=smcf.optimal_cost() / COST_SCALE)
    for k, (u, v, _) in enumerate(edges):
        flow = smcf.flow(k)
        if flow:
            _record_arc(sol, u, v, float(flow))
    return sol


def _record_arc(sol: FlowSolution, u, v, flow: float) -> None:
    if isinstance(u, tuple) and u[0] == "in" and isinstance(v, tuple) and v[0] == "r":
        sol.y[v[1]] = flow
    elif isinstance(u, tuple) and u[0] == "out" and isinstance(v, tuple) and v[0] == "in":
        sol.z[(0, u[1], v[1])] = flow
    elif isinstance(u, tuple) and u[0] == "src":
        sol.src[(0, v[1])] = sol.src.get((0, v[1]), 0.0) + flow
    elif isinstance(v, tuple) and v[0] == "dst":
        sol.snk[(u[1], 0)] = sol.snk.get((u[1], 0), 0.0) + flow


# --------------------------------------------------------------------------------------- several commodities


def solve_multicommodity(model: FlowModel, integer: bool, threshold: float | None = None) -> FlowSolution:
    """Max throughput, then min total cost, each microbatch back to its own commodity (GLOP or SCIP)."""
    solver = pywraplp.Solver.CreateSolver("SCIP" if integer else "GLOP")
    if solver is None:
        raise RuntimeError("ortools solver unavailable")
    if integer:
        solver.SetTimeLimit(MIP_TIME_LIMIT_MS)
    variables = _lp_variables(solver, model, integer, threshold)
    y, z, src, snk = variables
    _lp_constraints(solver, model, variables)
    throughput = solver.Sum(list(src.values()))
    solver.Maximize(throughput)
    _check(solver.Solve(), "throughput")
    best = solver.Objective().Value()
    solver.Add(throughput >= best - 1e-6)
    solver.Minimize(_lp_cost(solver, model, variables))
    _check(solver.Solve(), "cost")
    return FlowSolution(
        throughput=best,
        cost=solver.Objective().Value(),
        y={k: v.solution_value() for k, v in y.items()},
        z={k: v.solution_value() for k, v in z.items()},
        src={k: v.solution_value() for k, v in src.items()},
        snk={k: v.solution_value() for k, v in snk.items()},
    )


def _check(status: int, what: str) -> None:
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        raise RuntimeError(f"multi-commodity {what} solve failed (status {status})")


def _lp_variables(solver, model: FlowModel, integer: bool, threshold: float | None):
    var = solver.IntVar if integer else solver.NumVar
    inf = solver.infinity()
    y = {p: var(0, model.view.relays[p].capacity, f"y{p}") for b in model.bundles for p in b.relays}
    z, src, snk = {}, {}, {}
    for c in range(len(model.commodities)):
        for (i, j), cost in model.arcs.items():
            if threshold is None or cost <= threshold:
                z[(c, i, j)] = var(0, inf, f"z{c}_{i}_{j}")
    for c, i in model.sources:
        src[(c, i)] = var(0, inf, f"s{c}_{i}")
    for i, c in model.sinks:
        if threshold is None or model.sinks[(i, c)] <= threshold:
            snk[(i, c)] = var(0, inf, f"t{i}_{c}")
    return y, z, src, snk


def _lp_constraints(solver, model: FlowModel, variables) -> None:
    y, z, src, snk = variables
    inflow: dict[tuple[int, int], list] = defaultdict(list)  # (commodity, bundle)
    outflow: dict[tuple[int, int], list] = defaultdict(list)
    for (c, i, j), v in z.items():
        outflow[(c, i)].append(v)
        inflow[(c, j)].append(v)
    for (c, i), v in src.items():
        inflow[(c, i)].append(v)
    for (i, c), v in snk.items():
        outflow[(c, i)].append(v)
    for i, bundle in enumerate(model.bundles):
        through = []
        for c in range(len(model.commodities)):
            solver.Add(solver.Sum(inflow[(c, i)]) == solver.Sum(outflow[(c, i)]))
            through.extend(inflow[(c, i)])
        solver.Add(solver.Sum(through) == solver.Sum([y[p] for p in bundle.relays]))
    for c, com in enumerate(model.commodities):
        solver.Add(solver.Sum([v for (cc, _), v in src.items() if cc == c]) <= com.demand)


def _lp_cost(solver, model: FlowModel, variables):
    y, z, src, snk = variables
    terms = [model.view.relays[p].compute_s * v for p, v in y.items()]
    terms += [model.arcs[(i, j)] * v for (_, i, j), v in z.items()]
    terms += [model.sources[k] * v for k, v in src.items()]
    terms += [model.sinks[k] * v for k, v in snk.items()]
    return solver.Sum(terms)


# ------------------------------------------------------------------------------------------- paths from flows


def decompose(model: FlowModel, sol: FlowSolution) -> Plan:
    """Integral flows into one path per microbatch: at every bundle the microbatches with the costliest
    prefixes take the cheapest relays and the cheapest continuations, to keep the worst path low."""
    view = model.view
    units: dict[int, list[tuple[float, int, list[str]]]] = defaultdict(list)  # bundle -> (prefix, commodity, path)
    for (c, i), amount in sorted(sol.src.items()):
        units[i].extend((model.sources[(c, i)], c, []) for _ in range(round(amount)))
    done: list[tuple[int, list[str]]] = []
    index = _exit_index(sol)
    for stage in range(1, view.n_stages + 1):
        for i in model.by_stage(stage):
            arrived = _through_relays(model, sol, i, units.pop(i, []))
            for c in range(len(model.commodities)):
                mine = sorted((u for u in arrived if u[1] == c), key=lambda u: -u[0])
                exits = _exits(model, index, c, i)
                for (prefix, _, path), (cost, j) in zip(mine, exits):
                    if j is None:
                        done.append((c, path))
                    else:
                        units[j].append((prefix + cost, c, path))
    return _assign(model, done)


def _through_relays(model: FlowModel, sol: FlowSolution, i: int, arrived: list) -> list:
    view = model.view
    slots = sorted(
        (view.relays[p].compute_s, p) for p in model.bundles[i].relays for _ in range(round(sol.y.get(p, 0.0)))
    )
    arrived = sorted(arrived, key=lambda u: -u[0])
    return [(prefix + compute, c, [*path, peer]) for (prefix, c, path), (compute, peer) in zip(arrived, slots)]


ExitIndex = dict[tuple[int, int], tuple[list[tuple[int, float]], list[float]]]


def _exit_index(sol: FlowSolution) -> ExitIndex:
    """(commodity, bundle) -> its flows to next bundles (j, amount) and to its sink, in the solution's order: one
    pass over the flows instead of one per (commodity, bundle), which made `decompose` quadratic in the arcs."""
    index: ExitIndex = defaultdict(lambda: ([], []))
    for (c, i, j), amount in sol.z.items():
        index[(c, i)][0].append((j, amount))
    for (i, c), amount in sol.snk.items():
        index[(c, i)][1].append(amount)
    return index


def _exits(model: FlowModel, index: ExitIndex, c: int, i: int) -> list[tuple[float, int | None]]:
    exits: list[tuple[float, int | None]] = []
    arcs, sinks = index.get((c, i), ((), ()))
    for j, amount in arcs:
        exits.extend((model.arcs[(i, j)], j) for _ in range(round(amount)))
    for amount in sinks:
        exits.extend((model.sinks[(i, c)], None) for _ in range(round(amount)))
    return sorted(exits, key=lambda e: e[0])


def _assign(model: FlowModel, done: list[tuple[int, list[str]]]) -> Plan:
    """Paths of a commodity go to its data nodes, each up to its own demand."""
    plan: Plan = {p: [] for com in model.commodities for p in com.data_nodes}
    for c, path in done:
        for peer in model.commodities[c].data_nodes:
            if len(plan[peer]) < model.demands[peer]:
                plan[peer].append(path)
                break
    return plan


def worst_path(view: SwarmView, plan: Plan) -> float:
    return max((view.path_cost(o, p) for o, paths in plan.items() for p in paths), default=0.0)


def total_cost(view: SwarmView, plan: Plan) -> float:
    return sum(view.path_cost(o, p) for o, paths in plan.items() for p in paths)


# ---------------------------------------------------------------------------------------------- the optimum


def solve_optimum(view: SwarmView, demands: dict[str, int], exact_integer: bool = True) -> Optimum:
    """The optimum routing on the global view (see module docstring)."""
    validate_demands(view, demands)
    model = build_model(view, demands)
    if model.demand == 0 or not model.bundles:
        return Optimum(0, 0.0, 0.0, 0.0, 0.0, 0.0, {p: [] for p in demands})
    single = len(model.commodities) == 1

    def solve(threshold: float | None, integer: bool) -> FlowSolution:
        if single:
            return min_cost_max_flow(model, threshold)
        return solve_multicommodity(model, integer, threshold)

    lp = solve(None, integer=False)
    target = lp.throughput
    cap = _bottleneck_threshold(model, target, lambda t: solve(t, integer=False).throughput)
    candidates = []
    for threshold in (None, cap):
        sol = solve(threshold, integer=exact_integer)
        plan = decompose(model, sol)
        candidates.append((worst_path(view, plan), total_cost(view, plan), plan, sol))
    worst, cost, plan, sol = min(candidates, key=lambda c: (-_count(c[2]), c[0], c[1]))
    return Optimum(
        throughput=_count(plan),
        lp_throughput=lp.throughput,
        total_cost=cost,
        lp_total_cost=lp.cost,
        worst_path=worst,
        worst_path_lower_bound=lp.cost / lp.throughput if lp.throughput else 0.0,
        plan=plan,
    )


def _count(plan: Plan) -> int:
    return sum(len(v) for v in plan.values())


def _bottleneck_threshold(model: FlowModel, target: float, throughput_at) -> float | None:
    """The smallest cap on inter-bundle link terms that still carries `target` microbatches."""
    values = sorted(set(model.arcs.values()) | set(model.sinks.values()))
    if not values:
        return None
    lo, hi = 0, len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if throughput_at(values[mid]) >= target - 1e-6:
            hi = mid
        else:
            lo = mid + 1
    return values[lo]


class OracleRouter(Router):
    """The optimum on the global view (exact; slow on large swarms: a yardstick, not a deployment router)."""

    name = "oracle"

    def plan(self, view: SwarmView, demands: dict[str, int]) -> Plan:
        return self._record(solve_optimum(view, demands).plan)
