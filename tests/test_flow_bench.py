"""gwtf.benchmarks.flow end to end on a tiny swarm: the summary it writes, with and without cross-relay exchanges."""

import argparse
import json
from collections import Counter

import pytest

from gwtf.benchmarks import flow
from gwtf.errors import UserError
from gwtf.routing import optimum
from gwtf.routing.baselines import SwarmComputeRouter, SwarmRouter, _interleave
from gwtf.routing.graph import build_model
from gwtf.routing.simulator import TopologyConfig, random_topology


@pytest.mark.parametrize("exchange", [False, True])
def test_flow_benchmark_writes_its_summary(tmp_path, exchange):
    out = tmp_path / "flow.json"
    argv = ["--nodes", "40", "--stages", "4", "--seeds", "1", "--rounds", "30", "--iterations", "1"]
    assert flow.main(argv + ["--json", str(out)] + (["--exchange"] if exchange else [])) == 0
    summary = json.loads(out.read_text())
    assert summary["exchange"] is exchange and len(summary["runs"]) == 1
    assert 0 < summary["optimality_ratio_min"] <= 1.0  # measured against the optimum of the same run
    assert summary["worst_path_cost_ratio_mean"] > 0 and summary["iteration_time_vs_swarm"] > 0


def test_flow_benchmark_times_the_optimums_plan_on_request(tmp_path):
    out = tmp_path / "flow.json"
    argv = ["--nodes", "40", "--stages", "4", "--seeds", "1", "--rounds", "30", "--iterations", "1", "--oracle-timing"]
    assert flow.main(argv + ["--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["oracle_iteration_time_vs_swarm"] > 0
    assert "oracle_iteration_time_vs_swarm" in summary["runs"][0]


def test_mean_ci_is_students_t_interval_and_leaves_out_what_has_no_value():
    from gwtf.benchmarks.stats import fmt, mean_ci, t975

    ci = mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3: half-width t(2) * 1 / sqrt(3)
    assert ci["mean"] == 2.0 and ci["n"] == 3
    assert ci["high"] - ci["mean"] == pytest.approx(4.303 / 3**0.5, rel=1e-4)
    assert mean_ci([5.0]) == {"mean": 5.0, "low": 5.0, "high": 5.0, "n": 1}
    assert mean_ci([2.0, float("inf"), None, float("nan"), 4.0])["n"] == 2  # a run that never reached its target
    assert mean_ci([])["n"] == 0 and fmt(mean_ci([])) == "n/a (no valid run)"
    assert t975(30) == 2.042 and 1.96 < t975(100) < t975(31) < 2.042
    with pytest.raises(ValueError):
        t975(0)


# ---------------------------------------------------------------------------------------------------------------
# the simulator's speed-ups compute what the plain versions did (same seed: same plans, same iteration times)


class _RepushSwarm(SwarmRouter):
    """SWARM's balancer as it was planned before: every full replica's entry pushed back after each pick."""

    def plan(self, view, demands):
        self._sync(view)
        load: Counter[str] = Counter()
        plan = {peer: [] for peer in demands}
        for origin in _interleave(demands):
            path = []
            for s in range(1, view.n_stages + 1):
                pick = self._pop(s, view, load)  # no `aside`: the full ones go back at once
                if pick is None:
                    return self._record(plan)
                path.append(pick)
            plan[origin].append(path)
        return self._record(plan)


def test_swarms_balancer_plans_and_times_as_before_when_full_replicas_wait_aside():
    cfg = TopologyConfig(nodes=300, stages=6)
    args = argparse.Namespace(iterations=6, churn_per_hour=0.99, progress=False)  # heavy churn: many joins
    fast, fast_churned = flow._timed_iterations(cfg, 3, SwarmRouter(3), args)
    plain, plain_churned = flow._timed_iterations(cfg, 3, _RepushSwarm(3), args)
    assert fast == plain and fast_churned == plain_churned > 0 and len(fast) == 6
    view, demands = random_topology(cfg, 4)
    a, b = SwarmRouter(4), _RepushSwarm(4)
    for _ in range(3):  # the heaps carry over between plans: they must stay the same too
        assert a.plan(view, demands) == b.plan(view, demands)
        assert sorted(map(sorted, a.heaps.values())) == sorted(map(sorted, b.heaps.values()))
        assert a.rng.random() == b.rng.random()


# Mean simulated iteration time over 8 iterations at N = 100, 10 %/h churn, measured at ccc7a8a (before the
# speed-ups), per seed: SWARM's balancer and the compute-time variant (GWTF's figures depend on the agent, which
# changes on its own; its equivalence is the simulator's, checked through SWARM above).
BEFORE = {0: (32.30008072668968, 28.819456574572843), 1: (39.226173767519825, 38.94848908027103)}


@pytest.mark.parametrize("seed", sorted(BEFORE))
def test_same_seed_same_iteration_times_as_before_the_speed_ups(seed):
    cfg, args = TopologyConfig(nodes=100), argparse.Namespace(iterations=8, churn_per_hour=0.1, progress=False)
    for router, before in zip((SwarmRouter(seed), SwarmComputeRouter(seed)), BEFORE[seed]):
        steps, _ = flow._timed_iterations(cfg, seed, router, args)
        assert sum(steps) / len(steps) == pytest.approx(before, rel=1e-12, abs=0)


def _exits_plain(model, sol, c, i):
    """optimum._exits as it was: one pass over every flow per (commodity, bundle)."""
    exits = []
    for (cc, a, j), amount in sol.z.items():
        if cc == c and a == i:
            exits.extend((model.arcs[(i, j)], j) for _ in range(round(amount)))
    for (a, cc), amount in sol.snk.items():
        if cc == c and a == i:
            exits.extend((model.sinks[(i, c)], None) for _ in range(round(amount)))
    return sorted(exits, key=lambda e: e[0])


def test_the_optimums_exit_index_gives_the_exits_of_the_plain_scan():
    view, demands = random_topology(TopologyConfig(nodes=120, stages=4), 2)
    model = build_model(view, demands)
    sol = optimum.solve_multicommodity(model, integer=False)
    index = optimum._exit_index(sol)
    assert len(model.commodities) > 1 and sol.z
    for c in range(len(model.commodities)):
        for i in range(len(model.bundles)):
            assert optimum._exits(model, index, c, i) == _exits_plain(model, sol, c, i)


def test_timing_only_runs_and_merges_seeds_run_apart(tmp_path):
    base = ["--nodes", "40", "--stages", "4", "--iterations", "2", "--timing-only", "--seeds", "1"]
    for seed in (0, 1):
        assert flow.main(base + ["--first-seed", str(seed), "--json", str(tmp_path / f"s{seed}.json")]) == 0
    one = json.loads((tmp_path / "s1.json").read_text())
    assert one["timing_only"] and "optimality_ratio_mean" not in one and one["runs"][0]["seed"] == 1
    merged = tmp_path / "all.json"
    assert flow.main(["--merge", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"), "--json", str(merged)]) == 0
    summary = json.loads(merged.read_text())
    assert [r["seed"] for r in summary["runs"]] == [0, 1] and summary["seeds"] == 2
    assert summary["intervals"]["iteration_time_vs_swarm"]["n"] == 2
    with pytest.raises(UserError, match="repeat"):
        flow.main(["--merge", str(tmp_path / "s0.json"), str(tmp_path / "s0.json")])
