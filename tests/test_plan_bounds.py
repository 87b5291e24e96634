"""gwtf.benchmarks.plan_bounds: the lower bound holds for every plan; the search keeps capacities and microbatches."""

import random
from collections import Counter

import pytest

from gwtf.benchmarks.harness.scenario import load_scenario
from gwtf.benchmarks.plan_bounds import (
    ROUTERS,
    agent_variant,
    congestion_objective,
    gwtf_objective,
    lower_bound,
    random_plan,
    scenario_problem,
    search,
    topology_problem,
)
from gwtf.errors import UserError
from gwtf.routing.registry import make_router


def _check_plan(problem, plan):
    load = Counter(r for paths in plan.values() for path in paths for r in path)
    assert all(load[r] <= problem.view.relays[r].capacity for r in load)
    assert {o: len(paths) for o, paths in plan.items()} == problem.demands
    for paths in plan.values():
        for path in paths:
            assert [problem.view.relays[r].stage for r in path] == list(range(1, problem.view.n_stages + 1))


def test_geo10_bounds_hold_and_search_improves():
    problem = scenario_problem(load_scenario("benchmarks/scenarios/geo10.toml"))
    assert sum(problem.demands.values()) == 8 and len(problem.view.relays) == 9
    bound = lower_bound(problem)["lower_bound"]
    rng = random.Random(0)
    plans = [make_router(name, 0).plan(problem.view, problem.demands) for name in ROUTERS]
    plans += [random_plan(problem, rng) for _ in range(20)]
    times = [problem.time(plan) for plan in plans]
    assert bound > 0 and all(t >= bound for t in times)
    best_t, best = search(problem, plans[:4], rng, restarts=1, max_evals=300)
    _check_plan(problem, best)
    assert bound <= best_t <= min(times[:4]) and abs(problem.time(best) - best_t) < 1e-12


def test_capacity_override_gives_slack():
    sc = load_scenario("benchmarks/scenarios/geo10.toml")
    tight, slack = scenario_problem(sc), scenario_problem(sc, capacity=8)
    assert all(r.capacity == 8 for r in slack.view.relays.values())
    # more room can only lower the bound (the stage part takes the best split)
    assert lower_bound(slack)["lower_bound"] <= lower_bound(tight)["lower_bound"]


def test_geo_wide_gives_routing_a_choice():
    sc = load_scenario("benchmarks/scenarios/geo-wide.toml")
    problem = scenario_problem(sc)
    relays = problem.view.relays.values()
    assert 20 <= len(relays) <= 24 and len({r.region for r in relays} | {sc.data_region}) == 10
    speeds = [n.speed for n in sc.nodes]
    assert max(speeds) / min(speeds) >= 4 and {r.capacity for r in relays} <= {1, 2, 3, 4}
    micro = sum(problem.demands.values())
    assert all(sum(problem.view.relays[r].capacity for r in reps) >= 1.5 * micro for reps in problem.stages)
    bound = lower_bound(problem)["lower_bound"]
    plans = [make_router(name, 0).plan(problem.view, problem.demands) for name in ROUTERS]
    for plan in plans:
        _check_plan(problem, plan)
    assert all(problem.time(plan) >= bound for plan in plans)


def test_flows_random_swarm_runs_in_waves_and_the_congestion_cost_counts_sharing():
    problem = topology_problem(40, 4, 0)
    assert all(sum(problem.view.relays[r].capacity for r in reps) > 0 for reps in problem.stages)
    assert sum(problem.demands.values()) > min(sum(problem.view.relays[r].capacity for r in reps)
                                               for reps in problem.stages)  # fmt: skip
    d, congested = gwtf_objective(problem), congestion_objective(problem)
    origin = sorted(problem.demands)[0]
    path = [reps[0] for reps in problem.stages]
    alone = {origin: [path]}
    assert congested(alone) == pytest.approx(d(alone))  # one microbatch: nothing shared, the same cost as d
    twice = {origin: [path, list(path)]}  # two on the same relays and links: each relay computes both, links share
    assert congested(twice) > d(twice) + 1e-3
    plan = make_router("swarm", 0).plan(problem.view, problem.demands)
    assert congested(plan) >= d(plan)


def test_agent_variants_set_the_agents_options_and_refuse_unknown_ones():
    name, make = agent_variant("exchange=1,moves=2,rounds=7,temperature0=0.5")
    router = make(3)
    assert name == "gwtf[exchange=1,moves=2,rounds=7,temperature0=0.5]" and router.rounds == 7
    assert router.cfg.exchange is True and router.cfg.moves == 2 and router.cfg.temperature0 == 0.5
    with pytest.raises(UserError, match="not an AgentConfig field"):
        agent_variant("speed=9")
