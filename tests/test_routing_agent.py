"""The GWTF agents: optimum on small unique cases, capacity never exceeded, liars contained, crash and join."""

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from gwtf.routing import DataInfo, LinkModel, RelayInfo, SwarmView
from gwtf.routing.agent import Advert, Request
from gwtf.routing.gwtf_router import GWTFRouter
from gwtf.routing.optimum import solve_optimum
from gwtf.routing.protocol import ProtocolRun

REGIONS = ["Japan", "LA", "London", "Iowa"]


def build(spec, data=(("d0", "Japan"),)) -> SwarmView:
    """spec: list of stages, each a list of (capacity, compute_s, region)."""
    relays = {
        f"s{s}r{k}": RelayInfo(f"s{s}r{k}", s, cap, comp, reg)
        for s, stage in enumerate(spec, start=1)
        for k, (cap, comp, reg) in enumerate(stage)
    }
    return SwarmView(len(spec), relays, {p: DataInfo(p, r, 0.01) for p, r in data}, 4 * 2**20, LinkModel())


def assert_within_capacity(run: ProtocolRun) -> None:
    for agent in run.agents.values():
        if agent.card.stage:
            assert len(agent.inbound) <= agent.card.capacity, agent.me
    load = Counter(p for paths in run.plan().values() for path in paths for p in path)
    assert all(load[p] <= run.view.relays[p].capacity for p in load)


def test_agents_reach_the_unique_optimum():
    # per stage a cheap Japan relay (cap 2) and a far, slow LA one: the optimum keeps both microbatches in Japan
    spec = [[(2, 0.1, "Japan"), (2, 0.3, "LA")] for _ in range(4)]
    view = build(spec)
    opt = solve_optimum(view, {"d0": 2})
    run = ProtocolRun(view, {"d0": 2}, seed=3)
    run.run(25)
    plan = run.plan()
    assert len(plan["d0"]) == opt.throughput == 2
    assert sorted(plan["d0"]) == sorted(opt.plan["d0"]) == [[f"s{s}r0" for s in range(1, 5)]] * 2


relay = st.tuples(st.integers(0, 3), st.sampled_from([0.05, 0.1, 0.2]), st.sampled_from(REGIONS))


@settings(max_examples=15, deadline=None)
@given(
    spec=st.lists(st.lists(relay, min_size=1, max_size=4), min_size=1, max_size=4),
    demand=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_capacity_never_exceeded(spec, demand, seed):
    view = build(spec, data=(("d0", "Japan"), ("d1", "LA")))
    run = ProtocolRun(view, {"d0": demand, "d1": demand}, seed=seed)
    for _ in range(20):
        run.step()
        assert_within_capacity(run)
    opt = solve_optimum(view, {"d0": demand, "d1": demand})
    assert sum(len(p) for p in run.plan().values()) <= opt.throughput


def test_lying_node_is_contained():
    spec = [[(4, 0.1, "Japan")], [(1, 0.1, "Japan"), (1, 0.1, "Japan")], [(2, 0.1, "Japan")]]
    view = build(spec)
    run = ProtocolRun(view, {"d0": 4}, seed=0)
    liar = run.agents["s1r0"]
    for _ in range(15):
        # the liar claims a free, costless, roomy stage 2 and floods its next stage with requests
        for peer in liar.subscribers:
            run.bus.send(peer, Advert("s1r0", 1, 1000, 0.0, (("Japan", 0.0),)))
        for target in ("s2r0", "s2r1"):
            slots = tuple((1000 + k, "Japan") for k in range(5))
            run.bus.send(target, Request("s1r0", slots))
            run.bus.send(target, Request("s1r0", slots[:1]))
        run.step()
        assert_within_capacity(run)
    assert run.agents["s2r0"].rejected + run.agents["s2r1"].rejected > 0  # oversized requests were dropped


def test_crash_and_join_reroute():
    spec = [[(2, 0.1, "Japan"), (2, 0.1, "LA")] for _ in range(3)]
    view = build(spec)
    router = GWTFRouter(seed=1, rounds=30, reconverge_rounds=20)
    plan = router.plan(view, {"d0": 3})
    assert len(plan["d0"]) == 3
    victim = plan["d0"][0][1]
    relays = {p: r for p, r in view.relays.items() if p != victim}
    relays["new"] = RelayInfo("new", 2, 2, 0.1, "Japan")
    after = SwarmView(view.n_stages, relays, view.data_nodes, view.activation_bytes, view.links)
    plan = router.plan(after, {"d0": 3})
    assert len(plan["d0"]) == 3  # nothing lost
    assert all(victim not in path for path in plan["d0"])
    assert any("new" in path for path in plan["d0"])  # the newcomer carries the victim's share
    assert_within_capacity(router.run)
