"""`gwtf status`: every state of a replica explained in words, the table's columns, and --watch refreshing until
Ctrl-C (a bounded loop: the test's sleep raises KeyboardInterrupt after the second frame)."""

from __future__ import annotations

import io
import time

import pytest

from gwtf.launch.cli import main
from gwtf.launch.status import check_watch, format_status, snapshot, watch
from gwtf.membership import InMemoryMembership, NodeRecord, RunRecord
from gwtf.node_states import confirmed_versions, explain, explain_all, found_gone, run_version


def node(peer_id: str, stage: int = 1, role: str = "relay", **kw) -> NodeRecord:
    fields = dict(status="serving", capacity=4, compute_s=0.01, region=None, state_version=9, holds_weights=True,
                  grad_norm=None, throughput=5.0, microbatches_done=7)  # fmt: skip
    return NodeRecord(peer_id=peer_id, role=role, stage=stage, **{**fields, **kw})


def run_record() -> RunRecord:
    return RunRecord("run-s", {"preset": "debug", "n_stages": 2}, "abc123", {}, created=1.0)


def swarm() -> dict[str, NodeRecord]:
    """One replica in every state, and two data nodes (the run is at the higher one's version, 9)."""
    nodes = [
        node("serving-one", held=1),
        node("joining-one", status="joining", state_version=0),
        node("stale-one", state_version=7),
        node("a-beat-behind", state_version=8),  # its record may just lag: records are written once a heartbeat
        node("confirmed-one", state_version=6),  # its record lags, but a data node saw it step to 9
        node("confirmed-stale", state_version=5),  # seen stepping to 6 only
        node("full-one", held=4),
        node("no-room-one", stage=2, held=1, room=0),
        node("crashed-one", stage=2),
        node("rebuilt-one", stage=2, rebuilt_from="mean(1,3)", device="cuda"),
        node("leaving-one", stage=2, status="leaving"),
        node("data-a", stage=0, role="data", state_version=9),
        node("data-b", stage=0, role="data", state_version=6),
    ]
    return {r.peer_id: r for r in nodes}


TELEMETRY = {  # what data nodes publish (gwtf.telemetry), in part
    "data-a": {"gone": ["crashed-one"], "versions": {"confirmed-one": 9, "confirmed-stale": 6}, "version": 9},
    "data-b": {"loss": 3.1},
}


def test_every_state_is_explained_in_words():
    why = explain_all(swarm(), TELEMETRY)
    assert why["serving-one"] == "serving"
    assert why["joining-one"] == "joining: downloading state"
    assert why["stale-one"] == "stale: at version 7, the run is at 9"
    assert why["a-beat-behind"] == "serving" and why["confirmed-one"] == "serving"
    assert why["confirmed-stale"] == "stale: at version 6, the run is at 9"
    assert why["full-one"] == "full: holds 4 of 4 microbatches"
    assert why["no-room-one"] == "full: all 4 slots promised (holds 1 now)"
    assert why["crashed-one"] == "unreachable: a data node found it gone"
    assert why["rebuilt-one"] == "serving; rebuilt from mean(1,3)"
    assert why["leaving-one"] == "leaving: takes no new microbatches"
    assert why["data-a"] == "serving" and why["data-b"] == "stale: at version 6, the run is at 9"
    without = explain_all(swarm())  # records only: no replica found gone, no version confirmed
    assert without["crashed-one"] == "serving" and without["confirmed-one"] == "stale: at version 6, the run is at 9"


def test_the_run_version_is_the_newest_serving_data_node():
    nodes = swarm()
    assert run_version(nodes) == 9
    assert run_version(nodes, {"data-b": {"version": 10}, "relay": {"version": 99}}) == 10  # published: fresher
    nodes["data-c"] = node("data-c", stage=0, role="data", state_version=12, status="joining")
    assert run_version(nodes) == 9  # a joining data node does not set the run's step
    assert run_version({p: r for p, r in nodes.items() if r.role == "relay"}) is None
    assert explain(node("old", state_version=0), None) == "serving"  # no data node: nothing is stale


def test_telemetry_without_the_gone_field_or_malformed_adds_nothing():
    assert found_gone(None) == {} and found_gone({"d": {"loss": 1.0}}) == {}
    assert found_gone({"d": "garbage", "e": {"gone": "crashed-one"}, "f": {"gone": [3, "x"]}}) == {"x": ["f"]}
    versions = {"d": {"versions": {"r": 4, "s": "5", "t": 2.0}}, "e": {"versions": {"r": 6}}, "f": {"versions": [1]}}
    assert confirmed_versions(versions) == {"r": 6} and confirmed_versions(None) == {}


def test_a_data_nodes_published_version_and_a_gone_peer_override_its_record():
    published = confirmed_versions({"d": {"version": 9}})  # its own record lags its telemetry
    assert published == {"d": 9}
    assert explain(node("d", stage=0, role="data", state_version=7), 9, confirmed=published["d"]) == "serving"
    gone_and_stale = node("r", state_version=2, held=4, rebuilt_from="mean(1,3)")
    assert explain(gone_and_stale, 9, ["d"]) == "unreachable: a data node found it gone"  # the rest is moot
    two = {"d1": {"gone": ["r"]}, "d2": {"gone": ["r"]}}
    assert explain(node("r"), 9, found_gone(two)["r"]) == "unreachable: 2 data nodes found it gone"


def test_the_table_shows_step_device_held_and_why():
    text = format_status(run_record(), swarm(), TELEMETRY)
    lines = text.splitlines()
    assert lines[0] == "run run-s  model hash abc123  stages 2  nodes 13  step 9"
    assert "device" in lines[2] and "held" in lines[2] and lines[2].rstrip().endswith("why")
    row = next(line for line in lines if "..rebuilt-one" in line)
    assert " cuda " in row and row.endswith("serving; rebuilt from mean(1,3)")
    assert next(line for line in lines if "..crashed-one" in line).endswith("unreachable: a data node found it gone")
    assert "stage 1: 7 replica(s), serving capacity 24" in text and "data nodes: 2" in text
    assert format_status(run_record(), swarm()).count("unreachable") == 0  # no telemetry: no such reason


def test_snapshot_marks_what_the_data_nodes_published_as_gone():
    store = InMemoryMembership.shared_store()
    for rec in swarm().values():
        InMemoryMembership(store, "run-s", rec.peer_id).announce(rec, ttl=60)
    reader = InMemoryMembership(store, "run-s")
    assert "unreachable" not in snapshot(run_record(), reader)  # nothing published yet
    InMemoryMembership(store, "run-s", "data-a").publish_telemetry(TELEMETRY["data-a"], ttl=60)
    assert "unreachable: a data node found it gone" in snapshot(run_record(), reader)

    class RecordsOnly:  # a membership without telemetry (an older version): the other reasons still show
        def live_nodes(self) -> dict[str, NodeRecord]:
            return reader.live_nodes()

    text = snapshot(run_record(), RecordsOnly())  # type: ignore[arg-type]
    assert "unreachable" not in text and "stale: at version 7, the run is at 9" in text


def test_watch_refreshes_until_ctrl_c():
    """Two frames, each from a fresh read (the record changes between them), then Ctrl-C ends it cleanly."""
    store = InMemoryMembership.shared_store()
    relay = InMemoryMembership(store, "run-s", "relay-one")
    data = InMemoryMembership(store, "run-s", "data-one")
    data.announce(node("data-one", stage=0, role="data", state_version=9), ttl=60)
    relay.announce(node("relay-one", state_version=7), ttl=60)
    reader, out, sleeps = InMemoryMembership(store, "run-s"), io.StringIO(), []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt
        relay.announce(node("relay-one", state_version=9), ttl=60)  # caught up by the next refresh

    frames = watch(lambda: snapshot(run_record(), reader), 0.5, out=out, sleep=sleep)
    text = out.getvalue()
    assert frames == 2 and len(sleeps) == 2 and all(0 <= s <= 0.5 for s in sleeps)
    first, second = text.split("\nrun run-s")
    assert "stale: at version 7, the run is at 9" in first and "stale" not in second
    assert text.count("every 0.5s, Ctrl-C to stop") == 2 and "\x1b[" not in text  # not a terminal: no redraw codes


def test_watch_says_when_a_read_times_out_and_goes_on():
    out, reads = io.StringIO(), []

    def render() -> str:
        reads.append(time.monotonic())
        if len(reads) == 1:
            raise TimeoutError
        return "table"

    def sleep(seconds: float) -> None:
        if len(reads) == 2:
            raise KeyboardInterrupt

    assert watch(render, 1.0, out=out, sleep=sleep) == 2
    assert "no answer from the DHT" in out.getvalue() and "table" in out.getvalue()


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_a_bad_watch_interval_is_one_line_before_the_dht_starts(value, capsys):
    t0 = time.monotonic()
    code = main(["status", "--run", "r", "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/QmNotThere", "--watch", value])
    err = capsys.readouterr().err
    assert code == 2 and f"--watch {value}" in err and len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - t0 < 10
    assert check_watch(None) is None and check_watch(2.5) == 2.5
