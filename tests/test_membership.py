"""Membership: node records live and expire, only owners write them, run records round trip, hashes must match."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import pytest

from gwtf.errors import UserError
from gwtf.launch.status import format_status
from gwtf.launch.status import run as status_command
from gwtf.membership import (
    DHT_OPS,
    DHT_OPS_ENV,
    DHTMembership,
    DhtOps,
    InMemoryMembership,
    NodeRecord,
    RunEnd,
    RunRecord,
    check_model_hash,
    dht_addresses,
    make_dht,
)

RUN = "run-m"


def node(peer_id: str, stage: int = 1, role: str = "relay", **kw) -> NodeRecord:
    fields = dict(
        status="serving",
        capacity=2,
        compute_s=0.01,
        region=None,
        state_version=3,
        holds_weights=True,
        grad_norm=None,
        throughput=5.0,
        microbatches_done=7,
    )
    return NodeRecord(peer_id=peer_id, role=role, stage=stage, **{**fields, **kw})


def run_record() -> RunRecord:
    return RunRecord(RUN, {"preset": "debug", "n_stages": 2}, "abc123", {"train": {"steps": 3}}, created=1.0)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` until it holds or `timeout` passes (records propagate and expire on their own clock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_in_memory_announce_live_and_expiry() -> None:
    clock = FakeClock()
    store = InMemoryMembership.shared_store()
    a = InMemoryMembership(store, RUN, "a", clock=clock)
    b = InMemoryMembership(store, RUN, "b", clock=clock)
    other_run = InMemoryMembership(store, "other", "c", clock=clock)
    a.announce(node("a"), ttl=5)
    b.announce(node("b", stage=2), ttl=10)
    other_run.announce(node("c"), ttl=10)
    assert set(a.live_nodes()) == {"a", "b"} and a.live_nodes()["b"].stage == 2
    clock.now += 6
    assert set(b.live_nodes()) == {"b"}  # a missed its refresh: dead
    a.announce(node("a", state_version=4), ttl=5)
    assert b.live_nodes()["a"].state_version == 4


def test_in_memory_owner_only() -> None:
    store = InMemoryMembership.shared_store()
    a = InMemoryMembership(store, RUN, "a")
    mallory = InMemoryMembership(store, RUN, "mallory")
    a.announce(node("a"), ttl=5)
    with pytest.raises(PermissionError):
        mallory.announce(node("a", capacity=99), ttl=5)
    assert a.live_nodes()["a"].capacity == 2


def test_in_memory_run_record_and_returned_copies() -> None:
    store = InMemoryMembership.shared_store()
    a = InMemoryMembership(store, RUN, "a")
    assert a.get_run(timeout=0) is None
    a.publish_run(run_record())
    got = InMemoryMembership(store, RUN).get_run(timeout=0)
    assert got == run_record()
    a.announce(node("a"), ttl=5)
    a.live_nodes()["a"].capacity = 50  # callers get copies
    assert a.live_nodes()["a"].capacity == 2


def test_heartbeat_keeps_record_alive_until_close() -> None:
    store = InMemoryMembership.shared_store()
    a = InMemoryMembership(store, RUN, "a")
    version = iter(range(10**6))
    a.start_heartbeat(lambda: node("a", state_version=next(version)), period=0.02, ttl=0.3)
    assert wait_until(lambda: a.live_nodes().get("a", node("a", state_version=0)).state_version >= 3, 5)
    a.close()
    assert wait_until(lambda: "a" not in a.live_nodes(), 5)
    with pytest.raises(ValueError):
        InMemoryMembership(store, RUN, "b").start_heartbeat(lambda: node("b"), period=1, ttl=1)


def test_the_run_ends_when_its_data_node_leaves_or_stays_unseen_past_the_grace() -> None:
    """A relay exits at the run's end: at once when the data node says it leaves, or when nobody else serves; when the
    data node's record is only missing (a read that missed it, a loaded DHT that let it lapse while it lingers for an
    export) not before `grace` seconds without it, and a data node seen serving again restarts that wait."""
    clock = FakeClock()
    relay = node("r1", state_version=5)
    data = node("d1", role="data", stage=0, state_version=5)
    end = RunEnd(5, grace=30.0, clock=clock)
    assert not end.over({"r1": node("r1", state_version=4)})  # the last step not reached: never over
    assert not end.over({"r1": relay, "d1": data})  # a data node lingers (for an export): not over
    other = node("r2", state_version=5)
    assert not end.over({"r1": relay, "r2": other})  # its record missed once (another relay still serves)
    clock.now += 29.0
    assert not end.over({"r1": relay, "r2": other})
    assert not end.over({"r1": relay, "d1": data})  # back: the wait starts again
    clock.now += 20.0
    assert not end.over({"r1": relay, "r2": other})
    clock.now += 30.0
    assert end.over({"r1": relay, "r2": other})  # unseen for the whole grace: it is gone
    # Nobody but the reader left serving (the bootstrap, last to go, missed the data node's "leaving"): over at once.
    assert RunEnd(5, clock=clock).over({"r1": relay, "d1": data}) is False
    last = RunEnd(5, grace=30.0, clock=clock, me="r1")
    assert not last.over({"r1": relay, "r2": other, "d1": data}) and last.over({"r1": relay})
    assert not RunEnd(5, grace=30.0, clock=clock).over({"r1": relay})  # a reader that is not r1: r1 still serves
    leaving = RunEnd(5, grace=30.0, clock=clock)
    assert leaving.over({"r1": relay, "d1": node("d1", role="data", stage=0, status="leaving", state_version=5)})
    assert RunEnd(5, grace=0.0).over({"r1": relay})  # one read, no grace (a join that failed at the run's end)


def test_model_hash_mismatch_refused() -> None:
    check_model_hash(run_record(), "abc123")
    with pytest.raises(UserError, match="run run-m uses model hash abc123, this node has fff: "):
        check_model_hash(run_record(), "fff")


def test_node_record_validates_fields() -> None:
    with pytest.raises(ValueError, match="role"):
        node("a", role="boss")
    with pytest.raises(ValueError, match="status"):
        node("a", status="sleeping")


def test_format_status_lists_stages_replicas_and_data_nodes() -> None:
    nodes = {
        "relay-one": node("relay-one", stage=1, capacity=3),
        "relay-two": node("relay-two", stage=1, capacity=1, status="joining"),
        "data-one": node("data-one", stage=0, role="data"),
    }
    text = format_status(run_record(), nodes)
    assert "stage 1: 2 replica(s), serving capacity 3" in text
    assert "stage 2: 0 replica(s)" in text and "(none)" in text
    assert "data nodes: 1" in text and "..data-one" in text and "joining" in text


# --- hivemind DHT --------------------------------------------------------------------------------------------


def test_dht_membership_records_signatures_and_expiry() -> None:
    dht_a = make_dht(None)
    dht_b = make_dht(dht_addresses(dht_a))
    try:
        a, b = DHTMembership(dht_a, RUN), DHTMembership(dht_b, RUN)
        import torch.multiprocessing

        # no torch_shm_manager daemon beside each node (hivemind would pick "file_system"); the DHT works as well
        assert torch.multiprocessing.get_sharing_strategy() == "file_descriptor"
        a.publish_run(run_record())
        assert b.get_run(timeout=10) == run_record()
        a.announce(node(str(dht_a.peer_id)), ttl=30)
        b.announce(node(str(dht_b.peer_id), stage=2), ttl=1.0)
        assert set(a.live_nodes()) == {str(dht_a.peer_id), str(dht_b.peer_id)}
        before = dict(DHT_OPS.counts)  # each DHT operation is counted once, by record kind
        a.announce(node(str(dht_a.peer_id)), ttl=30)
        a.live_nodes(), a.telemetry()
        grew = {k: n - before.get(k, 0) for k, n in DHT_OPS.counts.items() if n != before.get(k, 0)}
        assert grew == {"write nodes": 1, "read nodes": 1, "read telemetry": 1}

        # b writes under a's subkey: without a's private key the signature cannot match, so it is refused
        forged = node(str(dht_a.peer_id), capacity=99).to_dict()
        from hivemind.utils import get_dht_time

        assert not dht_b.store(f"gwtf/{RUN}/nodes", forged, get_dht_time() + 30, subkey=a.owner_key)
        assert a.live_nodes()[str(dht_a.peer_id)].capacity == 2
        assert b.live_nodes()[str(dht_a.peer_id)].capacity == 2

        # b stops refreshing: its record expires
        assert wait_until(lambda: str(dht_b.peer_id) not in a.live_nodes(), 10)
        assert DHTMembership(dht_b, "no-such-run").get_run(timeout=0.2) is None
    finally:
        dht_b.shutdown()
        dht_a.shutdown()


def test_status_command_errors_are_user_errors() -> None:
    dht = make_dht(None)
    try:
        args = argparse.Namespace(initial_peers=dht_addresses(dht), run="missing", timeout=0.5, public=False)
        with pytest.raises(UserError, match="run 'missing' not found"):
            status_command(args)
    finally:
        dht.shutdown()
    bad = argparse.Namespace(
        initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/" + "12D3KooWDQT26X8FVSayMmrqFNi3D8pfNNkHAsFtXqU4QxMG6FyQ"],
        run="x",
        timeout=0.5,
        public=False,
    )
    start = time.monotonic()
    with pytest.raises(UserError):
        status_command(bad)
    assert time.monotonic() - start < 60


def test_dht_ops_are_written_for_a_benchmark_to_read(tmp_path, monkeypatch) -> None:
    import json
    import os

    ops = DhtOps(every=3600.0)  # made before the variable is set, as in a node forked from a zygote
    monkeypatch.setenv(DHT_OPS_ENV, str(tmp_path))
    ops.add("read", f"gwtf/{RUN}/nodes")  # the first one is written at once
    ops.add("read", f"gwtf/{RUN}/nodes")  # then at most every `every` seconds, and at exit
    ops.add("write", f"gwtf/{RUN}/telemetry")
    path = tmp_path / f"{os.getpid()}.json"
    assert json.loads(path.read_text())["counts"] == {"read nodes": 1}
    ops.write()
    assert json.loads(path.read_text())["counts"] == {"read nodes": 2, "write telemetry": 1}
