"""Cost model on hand-checked numbers, the router interface, its registry, config and lifecycle, and the round-robin /
SWARM baselines (SWARM's balancer: its bias-corrected EMA, heap dispatch, new replicas first, bans)."""

import asyncio
from collections import Counter

import pytest

from gwtf.errors import UserError
from gwtf.routing import DataInfo, LinkModel, RelayInfo, SwarmView, make_router
from gwtf.routing.baselines import PerformanceEMA, SwarmComputeRouter, SwarmRouter
from gwtf.routing.config import ROUTER_NAMES, RoutingConfig
from gwtf.routing.cost import MB, link_cost
from gwtf.routing.registry import ROUTERS
from gwtf.routing.simulator import wave_time


def small_view(caps=((2, 1), (1, 2)), size=MB) -> SwarmView:
    relays = {}
    for s, stage_caps in enumerate(caps, start=1):
        for k, cap in enumerate(stage_caps):
            peer = f"s{s}r{k}"
            relays[peer] = RelayInfo(peer, s, cap, 0.1 * (k + 1), "Japan" if k == 0 else "LA")
    data = {"d0": DataInfo("d0", "Japan", 0.05), "d1": DataInfo("d1", "LA", 0.05)}
    return SwarmView(len(caps), relays, data, size, LinkModel())


def test_link_cost_hand_checked():
    # (0.1+0.3)/2 + (0.01+0.03)/2 + 2*100/(50+150) = 0.2 + 0.02 + 1.0
    assert link_cost(0.1, 0.3, 0.01, 0.03, 50.0, 150.0, 100) == pytest.approx(1.22)


def test_view_cost_uses_region_matrix():
    view = small_view()
    # Japan-LA: 50 ms one way, 28.44 MB/s (regions.json); 1 MB activations
    expected = (0.1 + 0.2) / 2 + 0.05 + 2 * MB / (2 * 28.44 * MB)
    assert view.cost("s1r0", "s2r1") == pytest.approx(expected)
    # same region: 1 ms, 2048 MB/s
    assert view.cost("s1r0", "s2r0") == pytest.approx(0.1 + 0.001 + 1 / 2048)
    view.links.measure("s1r0", "s2r1", 0.01, 100 * MB)
    view.links.measure("s2r1", "s1r0", 0.03, 300 * MB)
    assert view.cost("s1r0", "s2r1") == pytest.approx(0.15 + 0.02 + 2 / 400)


def test_make_router_names():
    for name in ("gwtf", "swarm", "round-robin", "oracle"):
        assert make_router(name, seed=1).name == name
    with pytest.raises(UserError):
        make_router("fastest")


@pytest.mark.parametrize("name", ["round-robin", "swarm"])
def test_baselines_respect_capacity(name):
    view = small_view()
    plan = make_router(name).plan(view, {"d0": 3, "d1": 3})
    load = Counter(p for paths in plan.values() for path in paths for p in path)
    assert all(load[p] <= view.relays[p].capacity for p in load)
    assert sum(len(v) for v in plan.values()) == 3  # every stage holds 3
    for paths in plan.values():
        assert all([view.relays[p].stage for p in path] == [1, 2] for path in paths)


def test_swarm_compute_prefers_measured_fast_replica():
    view = small_view(caps=((5, 5), (5, 5)))
    router = SwarmComputeRouter()
    for _ in range(5):
        router.observe("s1r1", 0.01)  # s1r1 advertises 0.2 s but measures fast
    plan = router.plan(view, {"d0": 1})
    assert plan["d0"][0][0] == "s1r1"


def test_performance_ema_is_bias_corrected_like_swarms():
    ema = PerformanceEMA()
    assert ema.seconds_per_task is None
    ema.update(2.0)
    assert ema.seconds_per_task == pytest.approx(2.0)  # not 0.1 * 2.0: the correction undoes the zero start
    ema.update(4.0, task_size=2.0)  # 2 s per task again
    assert ema.seconds_per_task == pytest.approx(2.0)
    ema.update(12.0)  # (0.1*12 + 0.9*(0.1*2 + 0.9*0.2)) / (1 - 0.9**3)
    assert ema.seconds_per_task == pytest.approx((1.2 + 0.9 * 0.38) / (1 - 0.9**3))
    ema.update(float("nan"))
    assert ema.updates == 3  # a bogus measurement is ignored


def one_stage(caps: dict[str, int]) -> SwarmView:
    relays = {p: RelayInfo(p, 1, c, 0.1, "Japan") for p, c in caps.items()}
    return SwarmView(1, relays, {"d0": DataInfo("d0", "Japan")}, MB, LinkModel())


def test_swarm_dispatch_follows_measured_throughput_of_whole_calls():
    view = one_stage({"fast": 100, "slow": 100})
    router = make_router("swarm")
    router.plan(view, {"d0": 2})  # both tried once (unmeasured: expected initial_s each)
    for _ in range(3):
        router.observe("fast", 0.1)  # whole calls as the caller timed them
        router.observe("slow", 0.3)
    load = Counter(path[0] for path in router.plan(view, {"d0": 40})["d0"])
    # The heap's virtual finish times: 3x the throughput gets ~3x the microbatches.
    assert load["fast"] + load["slow"] == 40 and 28 <= load["fast"] <= 31


def test_swarm_tries_a_new_replica_first_and_skips_full_ones():
    router = make_router("swarm")
    view = one_stage({"a": 100, "b": 100})
    for _ in range(5):
        router.plan(view, {"d0": 10})
        router.observe("a", 0.01)
        router.observe("b", 0.01)
    joined = one_stage({"a": 100, "b": 100, "new": 1})
    first = router.plan(joined, {"d0": 3})["d0"]
    assert first[0] == ["new"]  # at the heap's top key: evaluated at once
    assert all(path != ["new"] for path in first[1:])  # capacity 1: full after one


def test_swarm_bans_a_failed_replica_until_its_record_would_expire():
    now = [100.0]
    router = SwarmRouter(ban_s=8.0)
    router.clock = lambda: now[0]
    view = one_stage({"a": 10, "b": 10, "c": 10})
    plan = router.plan(view, {"d0": 3})
    assert router.reroute(view, plan["d0"][0], 1, dead={"a"}) in {"b", "c"}
    assert all(p[0] != "a" for p in router.plan(view, {"d0": 20})["d0"])  # banned, though its record is live
    now[0] += 8.5
    assert any(p[0] == "a" for p in router.plan(view, {"d0": 20})["d0"])  # back once the ban ran out
    gone = one_stage({"b": 10, "c": 10})
    router.plan(gone, {"d0": 1})
    assert "a" not in router.entry and "a" not in router.ema  # a replica whose record expired leaves the heap
    assert router.reroute(gone, ["b"], 1, dead={"b", "c"}) is None


def test_the_simulator_hands_swarm_caller_timed_calls_that_include_the_link():
    near = RelayInfo("near", 1, 4, 0.1, "Japan")
    far = RelayInfo("far", 1, 4, 0.1, "LA")
    view = SwarmView(1, {"near": near, "far": far}, {"d0": DataInfo("d0", "Japan")}, MB, LinkModel())
    seen: dict[str, list[float]] = {}
    wave_time(view, {"d0": [["near"], ["far"]]}, observe=lambda p, s: seen.setdefault(p, []).append(s))
    assert seen["near"][0] == pytest.approx(0.1 + 2 * (0.001 + 1 / 2048), rel=1e-3)
    assert seen["far"][0] > seen["near"][0] + 0.09  # Japan-LA's 50 ms each way and 28 MB/s are in it


def test_reroute_avoids_dead_and_full():
    view = small_view(caps=((1, 1, 1), (3,)))
    router = make_router("round-robin")
    plan = router.plan(view, {"d0": 2})
    path = plan["d0"][0]
    used = {p[0] for p in plan["d0"]}
    spare = ({"s1r0", "s1r1", "s1r2"} - used).pop()
    assert router.reroute(view, path, 1, dead={path[0]}) == spare


def test_the_registry_lists_every_router_and_each_name_builds_its_class():
    assert set(ROUTERS) == set(ROUTER_NAMES) == {"gwtf", "gwtf-p2p", "swarm", "round-robin", "oracle"}
    for name, cls in ROUTERS.items():
        cfg = RoutingConfig(router=name, round_s=0.5)
        router = make_router(cfg, seed=3)
        assert type(router) is cls and router.name == name
        assert router.seed == 3 and router.routing is cfg  # the run's routing settings reach the router
        assert type(make_router(name)) is cls  # a bare name (the old callers) gives the same class, default settings


@pytest.mark.parametrize(
    "fields, value",
    [({"router": "fastest"}, "'fastest'"), ({"round_s": 0.0}, "0.0"), ({"round_s": -0.5}, "-0.5"),
     ({"round_s": float("nan")}, "nan")],
)  # fmt: skip
def test_routing_config_refuses_an_unknown_router_or_a_round_that_is_not_positive(fields, value):
    with pytest.raises(UserError) as err:
        RoutingConfig(**fields)
    msg = str(err.value)
    assert "\n" not in msg and f"{next(iter(fields))}={value}" in msg  # one line that names the field and value
    if "router" in fields:
        assert all(name in msg for name in ROUTER_NAMES)  # and lists the choices


class Untouchable:
    """A node a router must not use: any attribute read fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"a planning router read node.{name}")


@pytest.mark.parametrize("name", ["round-robin", "swarm", "oracle", "gwtf"])
def test_a_planning_router_starts_closes_and_publishes_no_room(name):
    view = small_view()
    router = make_router(name)

    def views(records):
        raise AssertionError("a planning router read the records")

    asyncio.run(router.start(Untouchable(), 1, views, units=0))
    assert router.room() == -1
    assert router.plan(view, {"d0": 2, "d1": 1}) == make_router(name).plan(view, {"d0": 2, "d1": 1})
    asyncio.run(router.close())
    asyncio.run(router.close())  # closing twice is harmless too
    assert router.room() == -1


def test_a_live_swarm_router_learns_every_replica_from_calls_timed_at_their_callers():
    from tests.support import InProcessSwarm
    from tests.test_swarm_inprocess import fast_swarm, small_config

    async def main():
        swarm = InProcessSwarm(small_config(steps=3, microbatches=4), replicas=2,
                               settings=fast_swarm("routing.router=swarm"))  # fmt: skip
        await swarm.start()
        try:
            for _ in range(3):
                for report in (await swarm.step()).reports:
                    assert report.lost == 0 and report.partial == 0
        finally:
            await swarm.close()
        return swarm

    swarm = asyncio.run(asyncio.wait_for(main(), timeout=100))
    router = swarm.data_nodes[0].router
    assert isinstance(router, SwarmRouter)
    used = set(router.load)  # the replicas of its last plan
    measured = {p: e.seconds_per_task for p, e in router.ema.items() if e.updates}
    assert used and used <= set(measured)  # every replica it routed through was timed (network + queue + compute)
    assert all(0 < s < 30 for s in measured.values())
    assert all(e.updates >= 1 for e in router.ema.values())


def test_the_backward_leg_carries_each_replicas_call_timed_by_its_caller():
    from gwtf.runtime import schema

    # stage 2's replica (last) appends its queue + compute; stage 1's adds its call into it and its own entry
    t = schema.timing(None, "r2", 0.5, None, None)
    t = schema.timing(t, "r1", 0.25, "r2", 0.125)
    t = schema.timing(t, "d0", None, "r1", 0.0625)  # the data node: its call into stage 1
    assert schema.call_times({"timing": t}) == [("r2", 0.625), ("r1", 0.3125)]
    bad = [["r3", "x", 0.1], ["r4", 0.1], "junk", ["r5", -1.0, 0.1], ["r6", 0.1, None]]
    assert schema.call_times({"timing": bad}) == [] and schema.call_times({}) == []
