"""The live dashboard: the routing's gap to the optimum, a data node's telemetry and its round trip through the
membership, the dashboard's data model against an in-process swarm's own figures (flows, accounting, gap, a crash),
`gwtf dashboard`'s one-line refusals, and the web app served on 127.0.0.1. The page in a real browser, on a swarm of
processes: tests/test_dashboard_browser.py (integration tier)."""

import asyncio
import json
import re
import secrets
import socket
import time
from collections import Counter
from types import SimpleNamespace

import aiohttp
import pytest
import torch

from gwtf.auth import RunAccess
from gwtf.config import to_dict
from gwtf.dashboard.model import ABSENT_POLLS, RunWatch, at_step, merged_history
from gwtf.dashboard.server import Poller, make_app, serve
from gwtf.launch.cli import main
from gwtf.membership import DHTMembership, InMemoryMembership, NodeRecord, RunRecord, dht_addresses, make_dht
from gwtf.routing.base import DataInfo, RelayInfo, SwarmView
from gwtf.runtime.spec import run_spec
from gwtf.runtime.views import view_builder
from gwtf.telemetry import EVENTS, HISTORY, Telemetry, route_links, routing_gap
from gwtf.transport import InProcessNetwork, InProcessTransport, Message
from tests.support import InProcessSwarm
from tests.test_swarm_inprocess import fast_swarm, small_config


def run(coro, timeout: float = 100):
    return asyncio.run(asyncio.wait_for(coro, timeout=timeout))


# ---------------------------------------------------------------------------------------------------------------
# The gap


def two_by_two() -> SwarmView:
    """Stage 1: a1 (0.1 s), a2 (0.3 s); stage 2: b1 (0.1 s), b2 (0.2 s); one microbatch each; every link 1 ms (same
    region, no activation bytes). Paths: a1-b1 0.203 s, a1-b2 0.303, a2-b1 0.403, a2-b2 0.503."""
    relays = {p: RelayInfo(p, k, 1, c) for p, k, c in [("a1", 1, 0.1), ("a2", 1, 0.3), ("b1", 2, 0.1), ("b2", 2, 0.2)]}
    return SwarmView(2, relays, {"d": DataInfo("d")}, activation_bytes=0)


def test_routing_gap_against_plans_whose_optimum_is_known():
    view = two_by_two()
    greedy = routing_gap(view, {"d": [["a1", "b1"], ["a2", "b2"]]}, {"d": 2})  # cheapest first, then what is left
    assert greedy["throughput"] == greedy["optimum_throughput"] == 2 and greedy["throughput_gap"] == 0
    assert greedy["worst_path"] == pytest.approx(0.503)
    assert greedy["optimum_worst_path"] == pytest.approx(0.403)  # a1-b2 and a2-b1: the worst path is lower
    assert greedy["worst_path_gap"] == pytest.approx(0.503 / 0.403 - 1)

    half = routing_gap(view, {"d": [["a1", "b2"]]}, {"d": 2})
    assert half["throughput"] == 1 and half["throughput_gap"] == pytest.approx(0.5)
    assert half["worst_path_gap"] == pytest.approx(0.303 / 0.403 - 1)  # fewer microbatches, a shorter worst path

    nothing = routing_gap(SwarmView(2, {}, {"d": DataInfo("d")}, 0), {"d": []}, {"d": 2})
    assert nothing["optimum_throughput"] == 0 and nothing["throughput_gap"] == nothing["worst_path_gap"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Telemetry


def test_telemetry_round_trip_in_memory_owner_only_expiring_and_bounded():
    now = [100.0]
    store = InMemoryMembership.shared_store()
    data = InMemoryMembership(store, "r", "data-0", clock=lambda: now[0])
    watcher = InMemoryMembership(store, "r", clock=lambda: now[0])  # no peer id: it only reads

    telemetry = Telemetry("data-0")
    report = SimpleNamespace(iteration=0, loss=4.0, tokens=512, seconds=0.5, started=4, finished=3, rerouted=1,
                             partial=1, lost=0)  # fmt: skip
    for i in range(HISTORY + 20):
        report.iteration = i
        telemetry.iteration(report, [["a1", "b1"], ["a1", "b1"], ["a2", "b2"]], two_by_two())
    for i in range(EVENTS + 10):
        telemetry.flight_events(i, restarts=1, reroutes=0, recoveries=0)
    telemetry.set_versions(HISTORY + 20, {"a1": HISTORY + 20})
    payload = telemetry.payload({"sent": {"forward": 10}, "received": {"head": 7}})
    assert len(payload["history"]) == HISTORY and payload["history"][-1]["iteration"] == HISTORY + 19
    assert len(payload["events"]) == EVENTS
    flows = {(a, b): (n, cost) for a, b, n, cost in payload["flows"]}
    assert flows[("data-0", "a1")][0] == 2 and flows[("a2", "b2")][0] == 1 and flows[("b1", "data-0")][0] == 2
    assert flows[("a1", "b1")][1] == pytest.approx(two_by_two().cost("a1", "b1"))

    data.publish_telemetry(payload, ttl=5.0)
    seen = watcher.telemetry()
    assert seen == {"data-0": json.loads(json.dumps(payload))}
    seen["data-0"]["history"].clear()  # a copy: the published telemetry is not changed through it
    assert len(watcher.telemetry()["data-0"]["history"]) == HISTORY
    with pytest.raises(PermissionError):
        watcher.publish_telemetry({"forged": True}, ttl=5.0)
    data.announce(NodeRecord("data-0", "data", 0, "serving", 0, 0.0, None, 3, True, None, 0.0, 0), ttl=8.0)
    now[0] += 3.0
    assert watcher.live_records()["data-0"][1] == pytest.approx(5.0)  # the seconds its record has left
    now[0] += 3.0
    assert watcher.telemetry() == {}  # expired


def test_the_transport_counts_bytes_per_message_kind_on_both_ends():
    async def main_():
        net = InProcessNetwork()
        a, b = InProcessTransport(net, "a", "r"), InProcessTransport(net, "b", "r")

        async def echo(msg: Message) -> Message:
            return Message(kind="pong", run_id="r", tensors=[msg.tensors[0] * 2])

        b.add_handler("echo", echo)
        await a.call("b", "echo", Message(kind="ping", run_id="r", tensors=[torch.ones(256)]), timeout=5)
        await a.call("b", "echo", Message(kind="ping", run_id="r", tensors=[torch.ones(256)]), timeout=5)
        return a.wire, b.wire

    a, b = run(main_())
    assert a["sent"]["ping"] == b["received"]["ping"] > 2 * 1024  # two frames of 1 KiB of floats and their headers
    assert b["sent"]["pong"] == a["received"]["pong"] > 2 * 1024


# ---------------------------------------------------------------------------------------------------------------
# The data model against an in-process swarm


def run_record(swarm: InProcessSwarm) -> RunRecord:
    config = {"run": to_dict(swarm.cfg), "data_nodes": swarm.n_data}
    return RunRecord(swarm.run_id, swarm.spec.model.to_dict(), swarm.spec.model.config_hash(), config)


class Spy:
    """What the data node routed: the router's plans (with the view and demands) and each microbatch's final route."""

    def __init__(self, node) -> None:
        self.plans: list[tuple[SwarmView, dict, dict]] = []
        self.routes: list[list[str]] = []
        plan, run_flight = node.router.plan, node._run_flight

        def spy_plan(view, demands):
            paths = plan(view, demands)
            self.plans.append((view, dict(demands), paths))
            return paths

        async def spy_flight(fl, report):
            await run_flight(fl, report)
            self.routes.append(list(fl.route))

        node.router.plan, node._run_flight = spy_plan, spy_flight

    def take(self) -> tuple[tuple[SwarmView, dict, dict], list[list[str]]]:
        first = next(p for p in self.plans if any(p[2].values()))  # the first wave's plan (an empty one is retried)
        routes, self.plans, self.routes = self.routes, [], []
        return first, routes


async def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.05)


def test_the_model_shows_the_swarm_s_own_flows_accounting_gap_and_crash():
    # A record TTL longer than the test's wait: the crashed relay is marked dead from a data node's probe, not from
    # its record expiring.
    settings = fast_swarm("membership.record_ttl_s=20.0")
    swarm = InProcessSwarm(small_config(steps=6, stages=2), replicas=2, settings=settings, capacity=2)
    watcher = InMemoryMembership(swarm.membership_store, swarm.run_id)
    watch = RunWatch(run_record(swarm), swarm.spec)

    async def main_():
        await swarm.start()
        node = swarm.data_nodes[0]
        spy = Spy(node)
        reports = []
        try:
            for step in range(4):
                before = {p: r.replica.stats.backward for p, r in swarm.relays.items()}
                if step == 3:  # a stage-2 relay dies while microbatches are in flight
                    victim = sorted(p for p, r in swarm.relays.items() if r.stage == 2)[0]
                    crash = asyncio.ensure_future(crash_soon(swarm, victim, after=0.05))
                reports.append((await swarm.step()).reports[0])
                await node.publish_telemetry()
                records = watcher.live_records()  # what the dashboard reads, and the expected gap is computed from
                watch.observe(records, watcher.telemetry())
                state = watch.state()
                (view, demands, plan), routes = spy.take()
                if step < 3:
                    live = {p: rec for p, (rec, _) in records.items()}
                    check_step(state, node, swarm, live, (view, demands, plan), routes, before, reports)
            await crash
            # the crash: the data node's calls to the victim failed; its publisher probes it and reports it gone
            await wait_for(lambda: victim in watcher.telemetry()[node.peer_id]["gone"], timeout=10)
            watch.observe(watcher.live_records(), watcher.telemetry())
            state = watch.state()
            assert victim in {p for p, _ in watcher.live_records().items()}  # its record has not expired yet
            boxes = {b["peer"]: b for st in state["stages"] for b in st["nodes"]}
            assert boxes[victim]["state"] == "dead" and "probe found it gone" in boxes[victim]["why"]
            crashes = [e for e in state["events"] if e["kind"] == "crash"]
            assert [e["peer"] for e in crashes] == [victim] and crashes[0]["step"] is not None
            assert state["accounting"]["total"] == totals(reports)  # the crash step is accounted too
            assert reports[3].lost == 0
        finally:
            await swarm.close()

    run(main_())


async def crash_soon(swarm: InProcessSwarm, victim: str, after: float) -> None:
    await asyncio.sleep(after)  # inside the iteration, while microbatches are in flight
    await swarm.crash(victim)


def totals(reports) -> dict[str, int]:
    return {k: sum(getattr(r, k) for r in reports) for k in ("started", "finished", "rerouted", "partial", "lost")}


def check_step(state, node, swarm, live, planned, routes, before, reports) -> None:
    """One step's state against the swarm: flows are the routes taken (and the microbatches each relay computed),
    accounting is the iteration reports, the gap is routing_gap of the data node's own view and plan."""
    me, (view, demands, plan) = node.peer_id, planned
    links = route_links(me, routes)
    assert sorted((a, b, n) for a, b, n, _ in state["flows"]["edges"]) == sorted(
        (a, b, n) for (a, b), n in links.items()
    )
    for a, b, _, cost in state["flows"]["edges"]:
        assert cost == pytest.approx(view.cost(a, b))
    into = Counter({b: n for (_, b), n in links.items()})
    for peer, relay in swarm.relays.items():
        assert relay.replica.stats.backward - before[peer] == into[peer]  # every microbatch routed was computed
    assert state["flows"]["iteration"] == reports[-1].iteration

    assert state["accounting"]["total"] == totals(reports)
    for row, report in zip(state["history"], reports, strict=True):
        assert row["iteration"] == report.iteration and row["loss"] == pytest.approx(report.loss)
        assert row["tokens_per_s"] == pytest.approx(report.tokens / report.seconds)

    same_view = node.view_builder(node._confirmed(live), node.iteration)  # the data node's view for its next plan
    expected = routing_gap(same_view, {me: plan[me]}, {me: demands[me]})
    gap = state["gap"]
    assert gap["available"] and gap["iteration"] == reports[-1].iteration
    assert {k: gap[k] for k in expected} == pytest.approx(expected)
    assert gap["throughput"] == len(plan[me]) == 4  # two replicas of capacity 2 per stage carry all four

    boxes = [[b["state"] for b in st["nodes"]] for st in state["stages"]]
    assert boxes == [["serving"], ["serving"] * 2, ["serving"] * 2]  # the data node, then each stage's replicas
    assert state["wire"]["sent"]["forward"] == node.transport.wire["sent"]["forward"] > 0


def test_a_record_missing_from_one_read_is_not_a_crash_and_a_finished_data_node_left():
    watch, membership, _ = fake_run()
    records, telemetry = membership.live_records(), membership.telemetry()
    watch.observe(records, telemetry)
    without_r2 = {p: r for p, r in records.items() if p != "r2"}
    for _ in range(ABSENT_POLLS - 1):  # a loaded DHT may miss a record in a read or two
        watch.observe(without_r2, telemetry)
        assert watch.nodes["r2"].ended == ""
    watch.observe(records, telemetry)  # back: the count starts again
    for _ in range(ABSENT_POLLS):
        watch.observe(without_r2, telemetry)
    assert (watch.nodes["r2"].ended, watch.nodes["r2"].why_ended) == ("dead", "its record expired")
    done = {"data-0": {**telemetry["data-0"], "finished": True}}
    for _ in range(ABSENT_POLLS):
        watch.observe({p: r for p, r in without_r2.items() if p != "data-0"}, done)
    assert watch.nodes["data-0"].ended == "left"  # it said it had finished: no crash
    kinds = [(e["kind"], e["peer"]) for e in watch.state()["events"] if e["kind"] in ("crash", "leave")]
    assert kinds == [("crash", "r2"), ("leave", "data-0")]


def test_a_rebuilt_stage_is_an_event_with_its_strategy_and_neighbours():
    watch, membership, _ = fake_run()
    records = dict(membership.live_records())
    rec, left = records["r2"]
    records["r2"] = (NodeRecord.from_dict({**rec.to_dict(), "rebuilt_from": "mean(1,3)"}), left)
    watch.observe(records, membership.telemetry())
    watch.observe(records, membership.telemetry())  # once, however often it is seen
    (rebuild,) = [e for e in watch.state()["events"] if e["kind"] == "rebuild"]
    assert rebuild["text"] == "stage 2 rebuilt by checkfree from mean(1,3) (r2)" and rebuild["stage"] == 2


def test_events_land_on_the_steps_axis_and_histories_merge():
    rows = {0: {"iteration": 0, "time": 10.0, "seconds": 1.0, "loss": 5.0, "val_loss": None, "tokens_per_s": 100.0,
                "started": 4, "finished": 4, "rerouted": 0, "partial": 0, "lost": 0}}  # fmt: skip
    rows[1] = {**rows[0], "iteration": 1, "time": 12.0, "loss": 4.0}
    other = {1: {**rows[1], "loss": 2.0, "finished": 2, "started": 2, "tokens_per_s": 50.0}}
    history = merged_history({"d0": rows, "d1": other})
    assert [r["iteration"] for r in history] == [0, 1]
    assert history[1]["loss"] == pytest.approx((4.0 * 4 + 2.0 * 2) / 6)  # weighted by their microbatches
    assert history[1]["started"] == 6 and history[1]["tokens_per_s"] == 150.0
    assert at_step(history, 9.5) == pytest.approx(-0.5)  # during step 0 (it started at 9.0)
    assert at_step(history, 11.0) == pytest.approx(0.5)  # halfway through step 1
    assert at_step(history, 20.0) == 2.0  # after the last step seen: on the step in progress


# ---------------------------------------------------------------------------------------------------------------
# The command's refusals


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_port_and_a_port_in_use_are_refused_in_one_line(capsys):
    args = ["dashboard", "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/QmNotThere", "--run", "r"]
    assert "--port 70000: a TCP port is 0..65535" in one_line_error(capsys, [*args, "--port", "70000"])
    assert "--host 'localhost' is not an IP address" in one_line_error(capsys, [*args, "--host", "localhost"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"port {port} on 127.0.0.1 is in use" in one_line_error(capsys, [*args, "--port", str(port)])


def test_a_keyed_run_is_not_watched_without_its_key_and_an_unknown_run_is_named(capsys, tmp_path):
    access = RunAccess("inv", secrets.token_bytes(32))
    dht = make_dht(None, access=access)
    try:
        DHTMembership(dht, "inv").publish_run(RunRecord("inv", {}, "h", {}, key_id=access.key_id))
        args = ["dashboard", "--initial-peers", *dht_addresses(dht), "--port", "0", "--timeout", "2"]
        err = one_line_error(capsys, [*args, "--run", "inv"])
        assert "run 'inv' is by invitation: watch it with --key FILE" in err
        assert "run 'nope' not found" in one_line_error(capsys, [*args, "--run", "nope"])
        wrong = tmp_path / "wrong.key"
        wrong.write_text(secrets.token_bytes(32).hex())
        assert "not the key of run 'inv'" in one_line_error(capsys, [*args, "--run", "inv", "--key", str(wrong)])
    finally:
        dht.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# The web app


def fake_run() -> tuple[RunWatch, InMemoryMembership, SwarmView]:
    """A run of two stages, one replica each and a data node, with one published iteration: no network."""
    cfg = small_config(stages=2)
    spec = run_spec("fake", cfg)
    record = RunRecord("fake", spec.model.to_dict(), spec.model.config_hash(), {"run": to_dict(cfg)})
    store = InMemoryMembership.shared_store()
    for peer, role, stage in (("data-0", "data", 0), ("r1", "relay", 1), ("r2", "relay", 2)):
        rec = NodeRecord(peer, role, stage, "serving", 4, 0.01, None, 1, True, None, 0.0, 0, device="cpu")
        InMemoryMembership(store, "fake", peer).announce(rec, ttl=30)
    watcher = InMemoryMembership(store, "fake")
    view = view_builder(spec, spec.microbatch_size)(watcher.live_nodes(), 1)  # as the data node sees the swarm
    telemetry = Telemetry("data-0")
    telemetry.planned(0, [["r1", "r2"]] * 4, 4)
    report = SimpleNamespace(iteration=0, loss=5.5, tokens=1024, seconds=0.5, started=4, finished=4, rerouted=0,
                             partial=0, lost=0)  # fmt: skip
    telemetry.iteration(report, [["r1", "r2"]] * 4, view)
    telemetry.set_versions(1, {"r1": 1, "r2": 1})
    InMemoryMembership(store, "fake", "data-0").publish_telemetry(telemetry.payload({"sent": {"forward": 9}}), 30)
    return RunWatch(record, spec), watcher, view


def test_the_app_serves_the_page_and_its_state_on_loopback_only():
    watch, membership, view = fake_run()

    async def main_():
        poller = Poller(watch, membership)
        await poller.poll_once()
        runner, port = await serve(make_app(poller), "127.0.0.1", 0)
        try:
            assert [a[0] for a in runner.addresses] == ["127.0.0.1"]
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/api/state") as r:
                    assert r.status == 200 and "default-src 'self'" in r.headers["Content-Security-Policy"]
                    state = await r.json()
                async with http.get(f"{base}/") as r:
                    page = await r.text()
                assets = re.findall(r'(?:src|href)="([^"]+)"', page)
                assert assets and all(a.startswith("/static/") for a in assets)  # nothing from another origin
                for asset in assets:
                    async with http.get(base + asset) as r:
                        assert r.status == 200, asset
                async with http.post(f"{base}/api/state") as r:
                    assert r.status == 405  # read-only
                async with http.get(f"{base}/static/../../membership.py") as r:
                    assert r.status in (403, 404)
        finally:
            await runner.cleanup()
        return state

    state = run(main_())
    assert [[b["peer"] for b in st["nodes"]] for st in state["stages"]] == [["data-0"], ["r1"], ["r2"]]
    hops = [("data-0", "r1"), ("r1", "r2"), ("r2", "data-0")]
    assert state["flows"]["edges"] == [[a, b, 4, pytest.approx(view.cost(a, b))] for a, b in hops]
    assert state["gap"]["available"] and state["gap"]["throughput"] == state["gap"]["optimum_throughput"] == 4
    assert state["history"][0]["loss"] == 5.5 and state["wire"]["sent"] == {"forward": 9}
    assert state["poll_error"] is None and state["run"]["id"] == "fake"
