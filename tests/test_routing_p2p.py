"""GWTF deployed one agent per node (router gwtf-p2p): the wire codec, and swarms whose relays and data nodes
negotiate their paths with their own agents over the in-process transport."""

import asyncio
import dataclasses
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from gwtf.errors import BadMessage, PeerError, UserError
from gwtf.faults import Fault
from gwtf.routing import DataInfo, LinkModel, RelayInfo, SwarmView
from gwtf.routing.agent import AgentConfig, ChainCost, Claim, Hello, Match, Offer, Request, Route, Yield
from gwtf.routing.agent.codec import decode, encode
from gwtf.routing.config import RoutingConfig
from gwtf.routing.p2p import HANDLER, P2PRouter
from gwtf.routing.protocol import ProtocolRun
from gwtf.routing.registry import make_router
from gwtf.trainer import train_local
from gwtf.transport import InProcessNetwork
from tests.support import InProcessSwarm, StubNode
from tests.test_routing_agent import build
from tests.test_swarm_inprocess import small_config

ALL = [
    Hello("a", 1),
    Claim("r", 3),
    Yield("d", 3),
    Request("a", ((3, "LA", 0.25, 0.5), (4, "Japan", 1, 0.0))),
    ChainCost("b", ((2, (("LA", 1.5),)), (5, ()))),
    Route("b", ((2, ("b", "c")), (3, ()))),
    Match("j", 7, Offer("i", 1, "j0", "LA", 0.5, (("LA", 2.0),), 9)),
]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_agent_messages_survive_the_wire(msg):
    import json

    wire = json.loads(json.dumps(encode(msg)))  # what the transport's JSON header carries
    assert decode(wire, msg.sender) == msg


@pytest.mark.parametrize(
    "wire, why",
    [
        (["Nope", "a"], "not an agent message"),
        (["Hello", "a"], "expected 2 fields"),
        (["Hello", "a", "1"], "expected an integer"),
        (["Hello", "a", True], "expected an integer"),
        (["Request", "a", [[3, "LA", float("nan"), 0.5]]], "finite"),
        (["Request", "a", [[3, "LA", 0.5]]], "expected 4 entries"),
        (["Route", "b", [[2, ["b", 7]]]], "string"),
        (["Match", "j", 7, ["Hello", "i", 1]], "expected a Offer"),
        (["Hello", "mallory", 1], "claims to come from"),
    ],
)
def test_malformed_or_forged_agent_messages_are_refused(wire, why):
    with pytest.raises(BadMessage, match=why):
        decode(wire, "a" if wire[1] == "mallory" else wire[1])


P2P_SWARM = ["membership.heartbeat_s=0.1", "membership.record_ttl_s=0.6", "transport.call_timeout=5.0",
             "iteration.microbatch_timeout=10.0", "routing.router=gwtf-p2p", "routing.round_s=0.02"]  # fmt: skip


def planned_paths(swarm: InProcessSwarm) -> list[list[str]]:
    return [p for d in swarm.data_nodes for p in d.router.service.agent.paths()]


def test_p2p_agents_route_a_swarm_like_the_trainer():
    # 2 replicas per stage of capacity 1 and 4 microbatches: the agents must find 2 disjoint paths; the losses are
    # the single-process trainer's (routing changes where, not what, is computed).
    cfg = small_config(steps=5)
    reference = train_local(cfg, progress=False)["losses"]

    async def go():
        swarm = InProcessSwarm(cfg, replicas=2, settings=P2P_SWARM, capacity=1)
        await swarm.start()
        try:
            losses = []
            for _ in range(4):
                result = await swarm.step()
                assert all(r.lost == 0 and r.partial == 0 for r in result.reports)
                losses.append(result.loss)
            paths = planned_paths(swarm)
            relays = [r for p in paths for r in p]
            assert len(paths) == 2 and len(set(relays)) == len(relays)  # capacity 1: two disjoint paths
            assert all(n.replica.stats.backward > 0 for n in swarm.relays.values())  # both paths carried traffic
            sent = {n.router.service.bus.sent for n in swarm.relays.values()}
            assert min(sent) > 0  # every relay's agent talked over the transport
            # A forged routing message is refused with an error, and the relay goes on routing.
            relay, data = swarm.relays["relay-s1-1"], swarm.data_nodes[0]
            forged = data.message(HANDLER, meta={"m": [["Hello", "relay-s1-2", 1]]})
            with pytest.raises(PeerError, match="claims to come from"):
                await data.call("relay-s1-1", HANDLER, forged)
            assert relay.router.service.refused == 1
            losses.append((await swarm.step()).loss)
            return losses
        finally:
            await swarm.close()

    losses = asyncio.run(asyncio.wait_for(go(), timeout=100))
    assert losses == pytest.approx(reference, abs=1e-4)


def test_p2p_agents_reroute_around_a_crash_and_take_in_a_joiner():
    # A stage-2 relay dies while microbatches are in flight: nothing is lost (the data node reroutes its flights),
    # the agents that knew it renegotiate once its record expires (one path is left: stage 2 has room for one), and
    # a stage-2 newcomer is taken into a second path by the agents, then carries traffic.
    cfg = small_config(steps=8, microbatches=4)

    async def until_paths(swarm, n, timeout=10.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while len(planned_paths(swarm)) != n:
            assert asyncio.get_running_loop().time() < deadline, planned_paths(swarm)
            await asyncio.sleep(0.05)

    async def step(swarm):
        result = await swarm.step()
        assert all(r.lost == 0 and r.partial == 0 for r in result.reports), result.reports
        return result

    async def go():
        victim = "relay-s2-3"  # the first replica of stage 2; capacity 1 puts a path through each
        swarm = InProcessSwarm(cfg, replicas=2, settings=P2P_SWARM, capacity=1, faults=[Fault(victim, 1, "backward")])
        await swarm.start()
        try:
            await step(swarm)
            rerouted = sum(r.rerouted for r in (await step(swarm)).reports)
            assert victim not in swarm.relays
            await until_paths(swarm, 1)
            assert all(victim not in p for p in planned_paths(swarm))
            await step(swarm)
            joiner = await swarm.add_relay(2)
            await until_paths(swarm, 2)
            assert any(joiner.peer_id in p for p in planned_paths(swarm))
            result = await step(swarm)
            assert joiner.replica.stats.backward > 0 and result.reports[0].waves == 2
            return rerouted
        finally:
            await swarm.close()

    assert asyncio.run(asyncio.wait_for(go(), timeout=100)) >= 1  # the crash hit microbatches in flight


def test_a_relay_found_gone_is_dropped_before_its_record_expires():
    # Records outlive a SIGKILLed relay by up to their TTL (here 60 s: longer than the run). The data node probes the
    # hop that failed and finds it gone: its views leave it out from then on, its agent renegotiates the dead relay's
    # slots, and a stage-1 newcomer is taken into the paths at once. Without it the agent kept the dead relay's
    # slots, the newcomer carried nothing and every iteration ran in two waves for the record's whole life.
    cfg = small_config(steps=8, microbatches=4, stages=2)
    victim = "relay-s1-1"

    async def go():
        settings = [*P2P_SWARM, "membership.record_ttl_s=60"]
        swarm = InProcessSwarm(cfg, replicas=2, settings=settings, capacity=2, faults=[Fault(victim, 2, "backward")])
        await swarm.start()
        try:
            for _ in range(4):
                result = await swarm.step()
                assert all(r.lost == 0 for r in result.reports), result.reports
            data = swarm.data_nodes[0]
            assert victim in data.gone and victim not in await data.live_nodes(max_age=0)
            joiner = await swarm.add_relay(1)
            deadline = asyncio.get_running_loop().time() + 10.0
            while not any(joiner.peer_id in p for p in planned_paths(swarm)):  # a few rounds: no record expires
                assert asyncio.get_running_loop().time() < deadline, planned_paths(swarm)
                await asyncio.sleep(0.05)
            waves = [(await swarm.step()).reports[0].waves for _ in range(3)]  # its record may lag a step behind
            assert joiner.replica.stats.backward > 0 and waves[-1] == 1, waves
        finally:
            await swarm.close()

    asyncio.run(asyncio.wait_for(go(), timeout=100))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_route_reports_give_a_data_node_the_paths_its_agents_hold(seed):
    # What a data node learns from Route messages is the chain of slots the agents hold, relay by relay (the
    # simulator reads the same chains off the agents directly), swaps included.
    spec = [[(2, 0.1, "Japan"), (1, 0.2, "LA"), (2, 0.05, "London")] for _ in range(4)]
    view = build(spec, data=(("d0", "Japan"), ("d1", "LA")))
    run = ProtocolRun(view, {"d0": 3, "d1": 3}, AgentConfig(routes=True), seed=seed)
    run.run(40)
    plan = run.plan()
    assert sum(len(p) for p in plan.values()) == 5  # capacity 5 per stage
    for d in ("d0", "d1"):
        assert sorted(run.agents[d].paths()) == sorted(plan[d])


def test_a_route_that_skips_a_stage_or_names_another_sender_is_dropped():
    view = build([[(2, 0.1, "Japan")], [(2, 0.1, "Japan")], [(2, 0.1, "Japan")]])
    run = ProtocolRun(view, {"d0": 1}, AgentConfig(routes=True), seed=0)
    run.run(15)
    relay = run.agents["s1r0"]
    (n,) = list(relay.outbound)
    assert relay.outbound[n].route == ("s2r0", "s3r0")
    bad = [Route("s2r0", ((n, ("s2r0",)),)), Route("s2r0", ((n, ("s3r0", "s2r0")),)), Route("s2r0", ((n, "s2r0"),))]
    relay.step(15, bad, run.directory)
    assert relay.rejected == len(bad) and relay.outbound[n].route == ("s2r0", "s3r0")


def test_two_data_nodes_share_the_relays_room():
    # The relays' agents grant slots to both data nodes from one capacity (under router gwtf each data node plans
    # the whole swarm on its own and both would count on the same room): capacity 1 x 2 replicas per stage gives
    # two disjoint paths, one per data node (contested room goes to the least served).
    cfg = small_config(steps=2)

    async def go():
        swarm = InProcessSwarm(cfg, replicas=2, data_nodes=2, settings=P2P_SWARM, capacity=1)
        await swarm.start()
        try:
            for _ in range(2):
                result = await swarm.step()
                assert all(r.lost == 0 and r.partial == 0 for r in result.reports)
            per_node = [d.router.service.agent.paths() for d in swarm.data_nodes]
            relays = [r for paths in per_node for p in paths for r in p]
            assert [len(p) for p in per_node] == [1, 1] and len(set(relays)) == len(relays) == 6
        finally:
            await swarm.close()

    asyncio.run(asyncio.wait_for(go(), timeout=100))


@pytest.mark.parametrize("evict", [True, False])
def test_a_late_data_node_takes_room_from_one_with_two_first_hops(evict):
    # Stage capacity 2; d0 starts first and takes both; d1 starts later with 2 microbatches. With evict (on in
    # gwtf-p2p) d1 takes one slot and its chain, and it stays 1 + 1; without, the room is never given back.
    view = build([[(2, 0.1, "Japan")], [(2, 0.1, "Japan")], [(2, 0.1, "Japan")]], data=(("d0", "Japan"), ("d1", "LA")))
    run = ProtocolRun(view, {"d0": 2, "d1": 0}, AgentConfig(routes=True, evict=evict), seed=0)
    run.run(20)
    assert [len(run.plan()[d]) for d in ("d0", "d1")] == [2, 0]
    run.agents["d1"].add_units(2)
    counts = [[len(p) for p in run.plan().values()] for _ in range(40) if run.step() is None]
    assert counts[-1] == ([1, 1] if evict else [2, 0])
    assert all(c == counts[-1] for c in counts[-20:])  # no swinging back and forth
    assert sorted(run.agents["d1"].paths()) == sorted(run.plan()["d1"])  # its Route reports followed the chain


def test_a_data_node_with_one_first_hop_keeps_it():
    view = build([[(1, 0.1, "Japan")], [(1, 0.1, "Japan")]], data=(("d0", "Japan"), ("d1", "LA")))
    run = ProtocolRun(view, {"d0": 1, "d1": 0}, AgentConfig(evict=True), seed=0)
    run.run(15)
    run.agents["d1"].add_units(1)
    run.run(30)
    assert [len(p) for p in run.plan().values()] == [1, 0]


def views_of(infos: dict) -> Callable[[dict], SwarmView]:
    """A 2-stage swarm view of the peers of `infos` whose record is there."""

    def views(records):
        relays = {p: i for p, i in infos.items() if p in records and isinstance(i, RelayInfo)}
        data = {p: i for p, i in infos.items() if p in records and isinstance(i, DataInfo)}
        return SwarmView(2, relays, data, 2**20, LinkModel())

    return views


def test_p2p_router_start_runs_the_nodes_agent_and_close_stops_it():
    # A data node (stage 0, 2 microbatches) and one relay per stage (capacity 2), each with its own router: start
    # makes and starts the node's agent service with the config's round, the agents negotiate two paths over the
    # transport, a relay's room is what its agent has left; close stops the rounds (the node itself stays open).
    infos = {
        "d0": DataInfo("d0", "Japan", 0.01),
        "r1": RelayInfo("r1", 1, 2, 0.1, "Japan"),
        "r2": RelayInfo("r2", 2, 2, 0.1, "Japan"),
    }

    views = views_of(infos)

    async def go():
        network, records = InProcessNetwork(), {p: SimpleNamespace(room=-1) for p in infos}
        nodes = {p: StubNode(network, p, records, n_stages=2) for p in infos}
        cfg = RoutingConfig(router="gwtf-p2p", round_s=0.01)
        routers = {p: make_router(cfg, seed=1) for p in infos}
        assert all(type(r) is P2PRouter and r.room() == -1 for r in routers.values())
        with pytest.raises(UserError, match="must be started first"):
            routers["d0"].plan(views(records), {"d0": 2})
        for p, stage, units in (("r2", 2, 0), ("r1", 1, 0), ("d0", 0, 2)):
            await routers[p].start(nodes[p], stage, views, units)
        services = {p: r.service for p, r in routers.items()}
        assert all(s is not None and s.round_s == 0.01 and s.task is not None for s in services.values())
        try:
            deadline = asyncio.get_running_loop().time() + 20
            while routers["d0"].plan(views(records), {"d0": 2}) != {"d0": [["r1", "r2"], ["r1", "r2"]]}:
                assert asyncio.get_running_loop().time() < deadline, services["d0"].agent.paths()
                await asyncio.sleep(0.02)
            assert routers["r1"].room() == routers["r2"].room() == 0  # both relays' slots are taken
            assert routers["d0"].room() == 0  # a data node's agent grants nothing
        finally:
            for r in routers.values():
                await r.close()
        for s in services.values():
            assert s.task.done() and s.refresher.done() and all(t.done() for t in s.pumps.values())
        rounds = {p: s.round_no for p, s in services.items()}
        await asyncio.sleep(0.1)
        assert {p: s.round_no for p, s in services.items()} == rounds  # no round after close
        assert not any(n.closed for n in nodes.values())

    asyncio.run(asyncio.wait_for(go(), timeout=60))


def test_after_the_only_data_node_dies_the_relays_room_returns_and_a_new_one_gets_paths():
    # The run's only data node dies: its record goes, the relays' agents drop its region's sink and release its
    # slots (their room returns), and a new data node gets both paths. Before the fix the relays' rounds raised
    # KeyError on the region that had no data node left and stopped for good: the new data node found no path
    # (issue 21). A read of the records that lacks the node's own is not trusted: nobody dies of it.
    infos = {
        "d0": DataInfo("d0", "Japan", 0.01),
        "d1": DataInfo("d1", "Japan", 0.01),
        "r1": RelayInfo("r1", 1, 2, 0.1, "Japan"),
        "r2": RelayInfo("r2", 2, 2, 0.1, "Japan"),
    }

    views = views_of(infos)

    async def until(what, ready, timeout=20.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while not ready():
            assert asyncio.get_running_loop().time() < deadline, what()
            await asyncio.sleep(0.02)

    async def go():
        network = InProcessNetwork()
        records = {p: SimpleNamespace(room=-1) for p in ("d0", "r1", "r2")}
        nodes = {p: StubNode(network, p, records, n_stages=2) for p in infos}
        routers = {p: make_router(RoutingConfig(router="gwtf-p2p", round_s=0.01), seed=1) for p in infos}
        try:
            for p, stage, units in (("r2", 2, 0), ("r1", 1, 0), ("d0", 0, 2)):
                await routers[p].start(nodes[p], stage, views, units)
            both = [["r1", "r2"], ["r1", "r2"]]
            await until(
                lambda: routers["d0"].service.agent.paths(), lambda: routers["d0"].service.agent.paths() == both
            )
            assert routers["r1"].room() == routers["r2"].room() == 0
            relays = [routers["r1"].service, routers["r2"].service]
            partial = dict(records)
            records.clear()  # a read that reached nobody: r1 and r2 keep their view
            await until(lambda: [s.partial_reads for s in relays], lambda: all(s.partial_reads for s in relays))
            assert routers["r1"].room() == routers["r2"].room() == 0
            records.update(partial)
            await routers["d0"].close()
            nodes["d0"].closed = True
            del records["d0"]  # gone at once, no goodbye: its record expired
            await until(lambda: [r.room() for r in routers.values()], lambda: routers["r1"].room() == 2)
            await until(lambda: routers["r2"].room(), lambda: routers["r2"].room() == 2)  # the Release reached r2
            records["d1"] = SimpleNamespace(room=-1)
            await routers["d1"].start(nodes["d1"], 0, views, 2)
            await until(
                lambda: routers["d1"].service.agent.paths(), lambda: routers["d1"].service.agent.paths() == both
            )
            assert all(not s.task.done() and s.round_errors == 0 for s in relays)
            assert routers["r2"].room() == 0
            await routers["r1"].close()
            nodes["r1"].closed = True
            del records["r1"]  # r2's own upstream dies: its room returns too
            await until(lambda: routers["r2"].room(), lambda: routers["r2"].room() == 2)
        finally:
            for r in routers.values():
                await r.close()

    asyncio.run(asyncio.wait_for(go(), timeout=60))


def test_an_agent_starts_once_its_own_record_shows_and_says_so_in_one_line_if_it_never_does(monkeypatch):
    """One read of a loaded DHT can miss the record a node stored just before (a geo-wide relay exited on it):
    the agent reads again until its own record is there, for a bounded time, then fails with one line."""
    import gwtf.routing.p2p as p2p

    infos = {"d0": DataInfo("d0", "Japan", 0.01), "r1": RelayInfo("r1", 1, 2, 0.1, "Japan")}

    async def go():
        network = InProcessNetwork()
        records = {"d0": SimpleNamespace(room=-1)}  # r1's own record is not readable yet
        node = StubNode(network, "r1", records, n_stages=1)
        router = make_router(RoutingConfig(router="gwtf-p2p", round_s=0.01), seed=1)
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, records.__setitem__, "r1", SimpleNamespace(room=-1))
        await router.start(node, 1, views_of(infos), 0)
        assert router.service.agent is not None and router.service.agent.card.peer_id == "r1"
        await router.close()

        monkeypatch.setattr(p2p, "OWN_RECORD_WAIT_S", 0.5)
        lonely = StubNode(network, "r2", {"d0": SimpleNamespace(room=-1)}, n_stages=1)
        with pytest.raises(PeerError, match="its own record was not in the DHT 0.5s after it was announced"):
            await make_router(RoutingConfig(router="gwtf-p2p", round_s=0.01), seed=1).start(lonely, 1, views_of(
                {**infos, "r2": RelayInfo("r2", 1, 2, 0.1, "Japan")}), 0)  # fmt: skip

    asyncio.run(asyncio.wait_for(go(), timeout=30))


def test_the_agents_optional_moves_are_run_settings_for_both_gwtf_routers():
    from gwtf.config import load_config

    routing = load_config(None, ["routing.router=gwtf-p2p", "routing.moves=2", "routing.exchange=true",
                                 "routing.takeover=true"]).routing  # fmt: skip
    assert make_router(dataclasses.replace(routing, router="gwtf")).cfg.moves == 2  # type: ignore[attr-defined]
    with pytest.raises(UserError, match="routing.moves=-1 must be >= 0"):
        RoutingConfig(moves=-1)
    infos = {"d0": DataInfo("d0", "Japan", 0.01), "r1": RelayInfo("r1", 1, 2, 0.1, "Japan")}

    async def go():
        records = {p: SimpleNamespace(room=-1) for p in infos}
        router = make_router(routing, seed=1)
        await router.start(StubNode(InProcessNetwork(), "r1", records, n_stages=1), 1, views_of(infos), 0)
        cfg = router.service.agent.cfg
        assert (cfg.moves, cfg.exchange, cfg.takeover, cfg.routes, cfg.evict) == (2, True, True, True, True)
        await router.close()

    asyncio.run(asyncio.wait_for(go(), timeout=30))
