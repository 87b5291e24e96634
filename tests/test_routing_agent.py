"""The GWTF agents: optimum on small unique cases, capacity never exceeded, liars contained, crash and join."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gwtf.routing import DataInfo, LinkModel, RelayInfo, SwarmView
from gwtf.routing.agent import (
    EXPIRY_ROUNDS,
    REPORT_AGAIN_ROUNDS,
    Advert,
    Agent,
    AgentConfig,
    ChainCost,
    Handback,
    Hello,
    InProcessBus,
    InSlot,
    Lost,
    OutSlot,
    PeerCard,
    Permit,
    Release,
    Request,
    Taken,
    Transfer,
)
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
            slots = tuple((1000 + k, "Japan", 0.0, 0.0) for k in range(5))  # and claims to be the least served
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


class FlatCosts:
    def link(self, a: str, b: str) -> float:
        return 0.0


def lone_relay(n_stages: int = 2) -> tuple[Agent, InProcessBus]:
    bus = InProcessBus()
    agent = Agent(PeerCard("x", 1, "A", 0.1, 4), n_stages, FlatCosts(), bus, {"A": "d"}, AgentConfig(), seed=0)
    for card in (PeerCard("u", 0, "A", 0.0, 0), PeerCard("p", 2, "A", 0.1, 4), PeerCard("q", 2, "A", 0.1, 4)):
        agent.learn(card)
    return agent, bus


def test_swap_gives_the_long_prefix_the_cheap_continuation():
    agent, _ = lone_relay()
    agent.inbound[("u", 0)] = InSlot("A", prefix=1.0, out=0)
    agent.inbound[("u", 1)] = InSlot("A", prefix=0.1, out=1)
    agent.outbound[0] = OutSlot("q", ("u", 0), asked=0, held=True, chain={"A": 1.0})
    agent.outbound[1] = OutSlot("p", ("u", 1), asked=0, held=True, chain={"A": 0.1})
    agent.round_no = 50  # annealing has cooled: only improving swaps
    agent._swap()
    assert agent.inbound[("u", 0)].out == 1 and agent.outbound[1].paired == ("u", 0)
    assert agent.inbound[("u", 1)].out == 0 and agent.outbound[0].paired == ("u", 1)


def test_malformed_messages_are_dropped():
    agent, _ = lone_relay()
    agent.outbound[0] = OutSlot("p", ("u", 0), asked=0, held=True)
    bad = [
        ChainCost("p", ((0, (("A", float("nan")),)),)),  # NaN cost
        ChainCost("p", ((0, (("Mars", 1.0),)),)),  # unknown region
        ChainCost("p", ((0, (("A", 1.0),), "extra"),)),  # malformed entry
        ChainCost("u", ((0, (("A", 1.0),)),)),  # wrong stage
        Request("u", ((0, "A"),)),  # old two-field entry
        Advert("p", 2, 3, -1.0, ()),  # negative compute
    ]
    agent.step(1, bad, directory=None)
    assert agent.rejected == len(bad)
    assert agent.outbound[0].chain == {}


class NoDirectory:
    def lookup(self, stage, me, k, rng):
        return []


def test_unanswered_request_expires_and_the_microbatch_is_routed_again():
    agent, _ = lone_relay(n_stages=3)
    agent.add_next(PeerCard("p", 2, "A", 0.1, 4))
    agent.add_next(PeerCard("q", 2, "A", 0.1, 4))
    agent.inbound[("u", 0)] = InSlot("A", prefix=0.0)
    agent.step(0, [], NoDirectory())
    first = agent.inbound[("u", 0)].out
    assert first is not None
    silent = agent.outbound[first].peer
    for r in range(1, EXPIRY_ROUNDS + 2):  # the peer never answers
        agent.step(r, [], NoDirectory())
    out = agent.inbound[("u", 0)].out
    assert first not in agent.outbound  # the stale request was given up
    assert out is not None and agent.outbound[out].peer != silent  # and the microbatch asked the other peer


def test_a_relay_goes_on_routing_after_its_regions_last_data_node_left():
    # Live, the only data node of region A dies: its record expires, the service drops A from the sink regions and
    # calls peer_died. An advert heard before still prices A, and a relay further down holds slots labelled A until
    # the Release reaches it: its round raised KeyError, and the live agent stopped for good (issue 21).
    agent, bus = lone_relay(n_stages=3)
    agent.add_next(agent.known["p"])
    agent.add_next(agent.known["q"])  # never heard from: priced by estimate
    agent.step(0, [Advert("p", 2, 4, 0.1, (("A", 0.3),))], NoDirectory())
    agent.inbound[("u", 0)] = InSlot("A", prefix=0.1)
    agent.step(1, [], NoDirectory())
    assert agent.inbound[("u", 0)].out is not None and agent.spare == 3
    agent.inbound[("u", 1)] = InSlot("A", prefix=0.1)  # arrived as the news did: no next hop yet
    agent.sink_regions.clear()  # region A has no data node left
    agent.step(2, [], NoDirectory())  # prices A where an advert still does (p), nowhere else (q): nothing raises
    n = agent.inbound[("u", 0)].out
    peer = agent.outbound[n].peer
    agent.peer_died("u")
    agent.step(3, [], NoDirectory())
    assert agent.spare == agent.card.capacity and not agent.outbound  # the relay's room is back
    assert any(isinstance(m, Release) and m.slots == (n,) for m in bus.take()[peer])  # and the next relay's


def test_a_slot_whose_release_was_lost_is_released_by_the_next_report():
    # Live, a Release can be lost (a call that timed out under load): the downstream relay held the slot, and its
    # room, for good; the upstream peer's run could not get a path through it any more (issue 21). Its chain cost
    # is reported again every REPORT_AGAIN_ROUNDS rounds, and the upstream peer releases a slot it no longer has.
    bus = InProcessBus()
    last = Agent(PeerCard("z", 2, "A", 0.1, 2), 2, FlatCosts(), bus, {"A": "d"}, AgentConfig(), seed=0)
    relay = Agent(PeerCard("y", 1, "A", 0.1, 2), 2, FlatCosts(), bus, {"A": "d"}, AgentConfig(), seed=0)
    for agent in (last, relay):
        agent.known = {c.peer_id: c for c in (last.card, relay.card, PeerCard("d", 0, "A", 0.0, 0))}
    slot = last.inbound[("y", 7)] = InSlot("A", prefix=0.2, cost_told=0)  # reported at round 0, when y held it
    slot.sent_cost = last._cost_of(slot)  # then y gave out-slot 7 up, and its Release never arrived
    for r in range(REPORT_AGAIN_ROUNDS + 3):
        inbox = bus.take()
        relay.step(r, inbox.get("y", []), NoDirectory())
        last.step(r, inbox.get("z", []), NoDirectory())
        if not last.inbound:
            break
    assert not last.inbound and last.spare == 2 and r > REPORT_AGAIN_ROUNDS  # released, after the report came again


def test_a_slot_whose_lost_was_lost_is_routed_anew():
    # The other way round: z revoked y's slot 3 and its Lost never arrived, so y believed it held a hop at z that z
    # no longer had. y sends the slot's (label, prefix) again every REPORT_AGAIN_ROUNDS rounds; z, full now,
    # rejects it, and y routes the microbatch anew.
    bus = InProcessBus()
    last = Agent(PeerCard("z", 2, "A", 0.1, 1), 2, FlatCosts(), bus, {"A": "d"}, AgentConfig(deflect=False), seed=0)
    relay = Agent(PeerCard("y", 1, "A", 0.1, 2), 2, FlatCosts(), bus, {"A": "d"}, AgentConfig(), seed=0)
    cards = (last.card, relay.card, PeerCard("d", 0, "A", 0.0, 0), PeerCard("w", 1, "A", 0.1, 2))
    for agent in (last, relay):
        agent.known = {c.peer_id: c for c in cards}
    last.inbound[("w", 0)] = InSlot("A", prefix=0.2)  # z's one slot went to w
    relay.inbound[("d", 0)] = InSlot("A", prefix=0.1, out=3)
    relay.outbound[3] = OutSlot("z", ("d", 0), asked=0, held=True, sent=("A", 0.1))
    relay.next_no = 4
    for r in range(REPORT_AGAIN_ROUNDS + 3):
        inbox = bus.take()
        relay.step(r, inbox.get("y", []), NoDirectory())
        last.step(r, inbox.get("z", []), NoDirectory())
        if 3 not in relay.outbound:
            break
    assert 3 not in relay.outbound and r >= REPORT_AGAIN_ROUNDS  # given up once z said it does not hold it
    assert last.inbound.keys() == {("w", 0)}


def test_a_peer_never_heard_from_is_greeted_again():
    # Live, a relay's Hello can reach its next-stage peer before that peer has read its record: dropped, and the
    # relay never got an advert (adverts go to those who said Hello). It says Hello again while it has heard nothing.
    agent, bus = lone_relay(n_stages=3)
    agent.add_next(agent.known["p"])
    agent.add_next(agent.known["q"])
    bus.take()  # the first Hellos, lost
    agent.step(1, [Advert("p", 2, 4, 0.1, (("A", 0.3),))], NoDirectory())
    for r in range(2, REPORT_AGAIN_ROUNDS + 1):
        agent.step(r, [], NoDirectory())
    hellos = {dst for dst, msgs in bus.take().items() for m in msgs if isinstance(m, Hello)}
    assert hellos == {"q"}  # p was heard from


def test_a_relay_left_without_candidates_looks_in_the_directory_again():
    # A read that missed its only next-stage peer's record declared it dead (`peer_died`); the agent's own lookups
    # ask for peers with room, and a relay that never saw that peer's room would wait for good. Every
    # REPORT_AGAIN_ROUNDS rounds a relay with fewer candidates than it keeps takes the nearest again and greets them.
    agent, bus = lone_relay(n_stages=3)
    p = agent.known["p"]

    class Nearest(NoDirectory):
        def nearest(self, stage, me, k, rng, need_spare):
            assert stage == 2 and not need_spare
            return [p]

    agent.add_next(p)
    agent.peer_died("p")
    bus.take()
    for r in range(1, REPORT_AGAIN_ROUNDS + 1):
        agent.step(r, [], Nearest())
    assert "p" in agent.next
    assert any(isinstance(m, Hello) for m in bus.take().get("p", []))


def test_an_unchanged_advert_is_sent_again_after_one_was_refused():
    # Seen in processes: a stage-2 relay advertised before any data node existed (no regions), its next advert,
    # pricing the new data node's region, was refused by stage 1 (which had not read that record yet), and stage 1
    # kept the empty advert for good: no path, ever. Adverts go out again, unchanged, every REPORT_AGAIN_ROUNDS.
    bus, sinks = InProcessBus(), {}
    last = Agent(PeerCard("y", 2, "A", 0.1, 4), 2, FlatCosts(), bus, sinks, AgentConfig(), seed=0)
    last.learn(PeerCard("x", 1, "A", 0.1, 4))
    last.step(0, [Hello("x", 1)], NoDirectory())
    assert [m.cost for m in bus.take()["x"] if isinstance(m, Advert)] == [()]  # no data node yet: no region
    sinks["A"] = "d"  # a data node's record read
    last.step(1, [], NoDirectory())
    assert [dict(m.cost) for m in bus.take()["x"] if isinstance(m, Advert)] == [{"A": pytest.approx(0.1)}]  # refused
    adverts = []
    for r in range(2, REPORT_AGAIN_ROUNDS + 2):
        last.step(r, [], NoDirectory())
        adverts += [m for m in bus.take().get("x", []) if isinstance(m, Advert)]
    assert len(adverts) == 1 and dict(adverts[0].cost).keys() == {"A"}


def test_slow_relays_still_get_paths():
    # seconds per microbatch far above the simulator's: a path costs ~12 s, and must not look "blocked"
    spec = [[(2, 3.0, "Japan"), (1, 3.0, "LA")] for _ in range(4)]
    plan = GWTFRouter(seed=0, rounds=30).plan(build(spec), {"d0": 3})
    assert len(plan["d0"]) == 3


def test_moves_keep_capacity_and_the_optimum():
    spec = [[(2, 0.1, "Japan"), (2, 0.3, "LA")] for _ in range(4)]
    run = ProtocolRun(build(spec), {"d0": 2}, AgentConfig(moves=1), seed=5)
    for _ in range(30):
        run.step()
        assert_within_capacity(run)
    assert sorted(run.plan()["d0"]) == [[f"s{s}r0" for s in range(1, 5)]] * 2


def test_agent_config_is_validated():
    with pytest.raises(ValueError):
        AgentConfig(spread=0)
    with pytest.raises(ValueError):
        AgentConfig(cooling=1.0)


def test_contested_room_goes_to_the_least_served_data_node():
    bus = InProcessBus()
    relay = Agent(PeerCard("x", 1, "A", 0.1, 1), 2, FlatCosts(), bus, {"A": "d", "B": "e"}, AgentConfig(), seed=0)
    for card in (PeerCard("d", 0, "A", 0.0, 0), PeerCard("e", 0, "B", 0.0, 0)):
        relay.learn(card)
    served = Request("d", ((0, "A", 0.1, 0.9),))  # d has paths for 90 % of its demand, and is closer
    starved = Request("e", ((0, "B", 0.5, 0.1),))
    relay.step(1, [served, starved], NoDirectory())
    assert list(relay.inbound) == [("e", 0)]


class StageDirectory:
    """Every card of the asked stage but the asker's, as if all had room."""

    def __init__(self, cards: list[PeerCard]) -> None:
        self.cards = cards

    def lookup(self, stage, me, k, rng):
        return [c for c in self.cards if c.stage == stage and c.peer_id != me][:k]


def test_full_relay_deflects_a_request_to_a_peer_with_room():
    bus = InProcessBus()
    cards = [PeerCard("u", 0, "A", 0.0, 0), PeerCard("x", 1, "A", 0.1, 1), PeerCard("z", 1, "A", 0.1, 2)]
    agents = {c.peer_id: Agent(c, 2, FlatCosts(), bus, {"A": "u"}, AgentConfig(), seed=0) for c in cards}
    for agent in agents.values():
        for card in cards:
            agent.learn(card)
    agents["u"].add_next(cards[1])  # the data node knows only x, which another microbatch has filled
    agents["x"].inbound[("u", 99)] = InSlot("A", prefix=0.1)
    agents["u"].add_units(1)
    directory = StageDirectory(cards)
    for r in range(4):  # request (u), deflect (x), grant (z), reply (u): no round trip back to u in between
        inboxes = bus.take()
        for name in ("u", "x", "z"):
            agents[name].step(r, inboxes.get(name, []), directory)
    assert [out.peer for _, out in agents["u"].units()] == ["z"]
    assert list(agents["z"].inbound) == [("u", 1)] and ("u", 1) not in agents["x"].inbound


def test_a_relay_whose_measured_compute_changes_renegotiates():
    # In a swarm the first records carry no measurement yet (the runtime floors them at 1e-4 s): the first plan
    # sees equally fast relays and uses the one in the data node's region. Once the records say it is 100x slower
    # than its peers, the router must route around it, not keep the figures it started with.
    first = build([[(4, 1e-4, "Japan"), (4, 1e-4, "LA")], [(4, 1e-4, "Japan")]])
    router = GWTFRouter(seed=0)
    plan = router.plan(first, {"d0": 3})
    assert all(path[0] == "s1r0" for path in plan["d0"]) and len(plan["d0"]) == 3
    measured = build([[(4, 2.0, "Japan"), (4, 0.02, "LA")], [(4, 0.02, "Japan")]])
    plan = router.plan(measured, {"d0": 3})
    assert len(plan["d0"]) == 3 and all(path[0] == "s1r1" for path in plan["d0"])
    assert_within_capacity(router.run)
    # a small wobble of a measurement (within the tolerance) keeps the plan as it is
    wobble = build([[(4, 2.1, "Japan"), (4, 0.021, "LA")], [(4, 0.019, "Japan")]])
    assert router.plan(wobble, {"d0": 3}) == plan


def crossed(run: ProtocolRun) -> bool:
    """Japan's microbatch continues in London and London's in Japan."""
    plan = run.plan()
    return plan.get("dJ") == [["s1r0", "s2r0"]] and plan.get("dL") == [["s1r1", "s2r1"]]


def test_exchange_uncrosses_two_paths_no_local_move_can_fix():
    # One microbatch from Japan, one from London, every relay of room 1: stage 1 (Japan, London), stage 2 (London,
    # Japan). A wide random pick (spread) can leave the two paths crossed; a local swap needs two microbatches at
    # one relay and a move needs room, so only two stage-1 relays exchanging their next hops uncross them.
    spec = [[(1, 0.1, "Japan"), (1, 0.1, "London")], [(1, 0.1, "London"), (1, 0.1, "Japan")]]
    view = build(spec, data=(("dJ", "Japan"), ("dL", "London")))
    demands = {"dJ": 1, "dL": 1}
    for seed in range(40):
        run = ProtocolRun(view, demands, AgentConfig(spread=50.0), seed=seed)
        run.run(15)
        if crossed(run):
            break
    assert crossed(run), "no seed leaves the paths crossed: the test lost its subject"
    before = run.plan()
    cost_before = max(view.path_cost(o, p) for o, paths in before.items() for p in paths)
    run.run(10)  # nothing changes without exchanges
    assert run.plan() == before
    run.cfg.exchange = True  # the agents share the run's config
    for _ in range(15):
        run.step()
        assert_within_capacity(run)
        assert sum(len(p) for p in run.plan().values()) == 2  # never half-moved at the end of a round
    plan = run.plan()
    assert plan == {"dJ": [["s1r0", "s2r1"]], "dL": [["s1r1", "s2r0"]]}
    assert max(view.path_cost(o, p) for o, paths in plan.items() for p in paths) < cost_before
    assert sum(a.exchanges for a in run.agents.values()) == 2  # one exchange, counted by both relays
    for agent in run.agents.values():  # every slot re-keyed: no permit, offer or pending switch left behind
        assert not agent.permits and not agent.offers and not agent.switches, agent.me


@settings(max_examples=10, deadline=None)
@given(
    spec=st.lists(st.lists(relay, min_size=1, max_size=4), min_size=2, max_size=4),
    demand=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_exchanges_and_takeovers_keep_capacity_and_throughput(spec, demand, seed):
    view = build(spec, data=(("d0", "Japan"), ("d1", "LA")))
    demands = {"d0": demand, "d1": demand}
    plain = ProtocolRun(view, demands, AgentConfig(spread=1.0), seed=seed)
    cfg = AgentConfig(spread=1.0, exchange=True, takeover=True, exchange_cooldown=2)
    run = ProtocolRun(view, demands, cfg, seed=seed)
    plain.run(30)
    for _ in range(30):
        run.step()
        assert_within_capacity(run)
    assert sum(len(p) for p in run.plan().values()) == sum(len(p) for p in plain.plan().values())


def test_a_transfer_needs_the_owner_or_its_permit():
    agent, bus = lone_relay()
    agent.learn(PeerCard("v", 0, "A", 0.0, 0))
    agent.inbound[("u", 0)] = InSlot("A", prefix=0.5)
    stolen = Transfer("v", "u", 0, "v", 7, "A", 0.2, token=3)  # v claims u's slot without u's permit
    agent.step(1, [stolen], NoDirectory())
    assert ("u", 0) in agent.inbound and ("v", 7) not in agent.inbound
    assert any(isinstance(m, Lost) and m.slots == (7,) for m in bus.inboxes["v"])  # v is told to route anew
    agent.step(2, [Permit("u", 0, 3)], NoDirectory())  # u permits a peer presenting token 3
    agent.step(3, [stolen], NoDirectory())
    assert ("v", 7) in agent.inbound and ("u", 0) not in agent.inbound
    assert agent.inbound[("v", 7)].prefix == pytest.approx(0.2 + agent.card.compute_s)


def test_takeover_moves_a_costly_hop_to_a_newcomer_with_room():
    # The only stage-2 relay is in LA; a Japan relay joins it later. Nothing moves to the newcomer by itself (moves
    # are off and the LA relay is not full): the LA relay hands its microbatch over, with the up- and downstream
    # slots re-keyed in one round, so the path is whole at the end of every round.
    spec = [[(1, 0.1, "Japan")], [(1, 0.1, "LA")], [(1, 0.1, "Japan")]]
    view = build(spec)
    relays = {**view.relays, "new": RelayInfo("new", 2, 2, 0.1, "Japan")}
    joined = SwarmView(view.n_stages, relays, view.data_nodes, view.activation_bytes, view.links)
    for takeover in (False, True):
        router = GWTFRouter(seed=0, rounds=12, reconverge_rounds=0, cfg=AgentConfig(takeover=takeover))
        assert router.plan(view, {"d0": 1}) == {"d0": [["s1r0", "s2r0", "s3r0"]]}
        router.plan(joined, {"d0": 1})  # the newcomer joins; the rounds are stepped here
        run = router.run
        assert run is not None
        for _ in range(20):
            run.step()
            assert_within_capacity(run)
            assert len(run.plan()["d0"]) == 1
        expect = ["s1r0", "new", "s3r0"] if takeover else ["s1r0", "s2r0", "s3r0"]
        assert run.plan() == {"d0": [expect]}
        assert sum(a.takeovers for a in run.agents.values()) == int(takeover)
        assert len(run.agents["s2r0"].inbound) == int(not takeover)  # after a takeover the old holder kept nothing
        for agent in run.agents.values():
            assert not agent.handovers and not agent.leaving, agent.me


def test_a_declined_handover_leaves_the_microbatch_where_it_is():
    relay, bus = lone_relay()
    relay.learn(PeerCard("k", 1, "A", 0.1, 1))
    relay.inbound[("u", 0)] = InSlot("A", prefix=0.3, out=0)
    relay.outbound[0] = OutSlot("p", ("u", 0), asked=0, held=True, chain={"A": 0.5})
    relay.handovers[("u", 0)] = ("k", 0)
    relay.step(1, [Handback("k", "u", 0)], NoDirectory())
    assert not relay.handovers and relay.inbound[("u", 0)].out == 0  # unlocked, unchanged
    # a Taken for a handover never asked (or expired) is answered with a Handback: k drops its reservation
    relay.step(2, [Taken("k", "u", 0, 5, 0.4)], NoDirectory())
    assert any(isinstance(m, Handback) for m in bus.inboxes["k"]) and ("u", 0) in relay.inbound


def test_a_data_node_lists_its_cheapest_paths_first():
    # An iteration with more microbatches than paths runs extra waves on the plan's first paths (the simulator's
    # iteration_time and the data node's _plan_wave both): they should be the fastest the data node knows of.
    bus = InProcessBus()
    data = Agent(PeerCard("d", 0, "A", 0.0, 0), 2, FlatCosts(), bus, {"A": "d"}, AgentConfig(), seed=0)
    data.add_units(3)
    for n, (peer, cost) in enumerate([("p", 0.9), ("q", 0.2), ("p", 0.5)]):
        data.inbound[("d", n)].out = 10 + n
        data.outbound[10 + n] = OutSlot(peer, ("d", n), asked=0, held=True, chain={"A": cost})
    assert [n for n, _ in data.units()] == [11, 12, 10]


def test_a_last_stage_relay_forgets_a_permit_nobody_used():
    # Permits are held by the offerer's next hop, which may be a last-stage relay that never offers anything itself
    bus = InProcessBus()
    last = Agent(PeerCard("x", 2, "A", 0.1, 2), 2, FlatCosts(), bus, {"A": "d"}, AgentConfig(exchange=True), seed=0)
    last.learn(PeerCard("u", 1, "A", 0.1, 2))
    last.inbound[("u", 0)] = InSlot("A", prefix=0.5)
    last.step(1, [Permit("u", 0, 7)], NoDirectory())
    assert last.permits == {("u", 0): (7, 1)}
    for r in range(2, 3 + 2 * EXPIRY_ROUNDS):
        last.step(r, [], NoDirectory())
    assert not last.permits


def test_the_agent_handles_every_message_and_the_package_keeps_its_names():
    # Agent composes the core and every optional move (gwtf/routing/agent/agent.py): a move left out would make its
    # messages crash the agent instead of being handled, whatever the flags.
    import gwtf.routing.agent as package
    from gwtf.routing.agent import MESSAGE_TYPES

    assert len(MESSAGE_TYPES) == 21
    assert all(callable(getattr(Agent, f"_on_{name.lower()}", None)) for name in MESSAGE_TYPES)
    # every public name of the module gwtf/routing/agent.py was
    old_names = """EXPIRY_ROUNDS INF MAX_BATCH MAX_COST SlotKey Advert Hello Request Reply Lost Release ChainCost
        Route Claim Yield Deflect Offer Permit Match Transfer Declined Handover Taken Handback Moved Swapped Message
        Bus InProcessBus PeerCard Costs AgentConfig InSlot OutSlot NeighbourState Agent""".split()  # noqa: SIM905
    assert all(hasattr(package, name) for name in old_names)
