"""Cost model on hand-checked numbers, the router interface, its registry, config and lifecycle, and the round-robin /
SWARM baselines."""

import asyncio
from collections import Counter

import pytest

from gwtf.errors import UserError
from gwtf.routing import DataInfo, LinkModel, RelayInfo, SwarmView, make_router
from gwtf.routing.config import ROUTER_NAMES, RoutingConfig
from gwtf.routing.cost import MB, link_cost
from gwtf.routing.registry import ROUTERS


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


def test_swarm_prefers_measured_fast_replica():
    view = small_view(caps=((5, 5), (5, 5)))
    router = make_router("swarm")
    for _ in range(5):
        router.observe("s1r1", 0.01)  # s1r1 advertises 0.2 s but measures fast
    plan = router.plan(view, {"d0": 1})
    assert plan["d0"][0][0] == "s1r1"


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
