"""The optimum: networkx and ortools agree on hand-made graphs; LP, MIP and the oracle's plans are consistent."""

from collections import Counter

import pytest

from gwtf.routing import DataInfo, LinkModel, RelayInfo, SwarmView
from gwtf.routing.graph import build_model, networkx_min_cost_max_flow
from gwtf.routing.optimum import min_cost_max_flow, solve_multicommodity, solve_optimum, total_cost


def view_of(stages, data=(("d0", "Japan"),), size=2**20) -> SwarmView:
    """stages: list of lists of (capacity, compute_s, region)."""
    relays = {}
    for s, stage in enumerate(stages, start=1):
        for k, (cap, comp, region) in enumerate(stage):
            relays[f"s{s}r{k}"] = RelayInfo(f"s{s}r{k}", s, cap, comp, region)
    nodes = {p: DataInfo(p, region, 0.01) for p, region in data}
    return SwarmView(len(stages), relays, nodes, size, LinkModel())


HAND_MADE = [
    [[(2, 0.1, "Japan"), (1, 0.2, "LA")], [(1, 0.1, "Japan"), (3, 0.1, "LA")]],
    [[(1, 0.1, "Japan")] * 3, [(2, 0.3, "Iowa"), (2, 0.1, "Japan")], [(5, 0.05, "Japan")]],
    [[(4, 0.2, "London")], [(1, 0.1, "Japan"), (1, 0.1, "NL")]],
]


@pytest.mark.parametrize("stages", HAND_MADE)
@pytest.mark.parametrize("by_region", [True, False])
def test_networkx_and_ortools_agree(stages, by_region):
    view = view_of(stages)
    model = build_model(view, {"d0": 5}, by_region=by_region)
    nx_flow, nx_cost = networkx_min_cost_max_flow(model)
    sol = min_cost_max_flow(model)
    assert sol.throughput == nx_flow
    assert sol.cost == pytest.approx(nx_cost / 1e6, abs=1e-6)
    lp = solve_multicommodity(model, integer=False)
    assert lp.throughput == pytest.approx(nx_flow) and lp.cost == pytest.approx(sol.cost, abs=1e-5)


def test_hand_checked_optimum():
    # One data node in Japan, stage 1: a Japan relay (cap 1) and an LA relay (cap 1); stage 2 one Japan relay.
    view = view_of([[(1, 0.1, "Japan"), (1, 0.1, "LA")], [(2, 0.1, "Japan")]])
    opt = solve_optimum(view, {"d0": 3})
    assert opt.throughput == 2
    local = view.path_cost("d0", ["s1r0", "s2r0"])
    via_la = view.path_cost("d0", ["s1r1", "s2r0"])
    assert opt.total_cost == pytest.approx(local + via_la)
    assert opt.worst_path == pytest.approx(via_la)
    assert sorted(map(tuple, opt.plan["d0"])) == [("s1r0", "s2r0"), ("s1r1", "s2r0")]


def test_multicommodity_keeps_microbatches_home_and_capacity():
    stages = [[(2, 0.1, "Japan"), (2, 0.1, "LA")], [(1, 0.1, "Japan"), (2, 0.1, "LA")]]
    view = view_of(stages, data=(("d0", "Japan"), ("d1", "LA")))
    demands = {"d0": 2, "d1": 2}
    opt = solve_optimum(view, demands)
    lp = solve_multicommodity(build_model(view, demands), integer=False)
    assert opt.throughput == 3 == round(lp.throughput)
    assert opt.total_cost >= lp.cost - 1e-6
    load = Counter(p for paths in opt.plan.values() for path in paths for p in path)
    assert all(load[p] <= view.relays[p].capacity for p in load)
    assert total_cost(view, opt.plan) == pytest.approx(opt.total_cost)
    assert len(opt.plan["d1"]) == 2  # LA's microbatches can stay in LA; Japan's share the rest
