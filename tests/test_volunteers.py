"""Volunteers run by hand: strangers are refused before they touch the run, nodes end cleanly (their helper processes
with them), joiners spread over the stages, and what a volunteer sees."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gwtf.auth import RunAccess
from gwtf.errors import UserError
from gwtf.launch.processes import ProcessGroup, read_jsonl
from gwtf.membership import DHTMembership, NodeRecord, RunRecord, check_invitation, dht_addresses, make_dht

RUN = "vol"


def serving_relay(peer: str, stage: int, version: int) -> NodeRecord:
    """A serving relay's record at `version` (capacity 2, compute 0.1 s) for the placement and standby tests."""
    return NodeRecord(peer, "relay", stage, "serving", 2, 0.1, None, version, True, None, 0.0, 0)


QUICK = ["--set", "membership.heartbeat_s=0.5", "--set", "membership.record_ttl_s=4.0"]


# ---- strangers -------------------------------------------------------------------------------------------------


def test_check_invitation_refuses_strangers_before_they_join_the_dht() -> None:
    access = RunAccess(RUN, secrets.token_bytes(32))
    keyed_owner = make_dht(None, access=access)
    open_owner = make_dht(None, access=RunAccess.open("open"))
    try:
        DHTMembership(keyed_owner, RUN).publish_run(RunRecord(RUN, {}, "h", {}, key_id=access.key_id))
        DHTMembership(open_owner, "open").publish_run(RunRecord("open", {}, "h", {}))
        keyed_peers, open_peers = dht_addresses(keyed_owner), dht_addresses(open_owner)
        assert check_invitation(keyed_peers, access, timeout=10).key_id == access.key_id  # the invited
        cases = [
            (keyed_peers, RunAccess(RUN, secrets.token_bytes(32)), "this key is not the key of run 'vol'"),
            (keyed_peers, RunAccess.open(RUN), "is by invitation: join with --key FILE"),
            (open_peers, RunAccess("open", secrets.token_bytes(32)), "is open: join it without --key"),
            (keyed_peers, RunAccess.open("other"), "run 'other' not found"),
        ]
        for peers, stranger, said in cases:
            with pytest.raises(UserError, match=said):
                check_invitation(peers, stranger, timeout=2)
    finally:
        keyed_owner.shutdown()
        open_owner.shutdown()


def _cli(*argv: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "gwtf.launch.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    return done, time.monotonic() - t0


def _start_run(group: ProcessGroup, out: Path, name: str, *access: str, steps: int = 5000) -> list[str]:
    addr = out / f"{name}.addr"
    argv = ["bootstrap", "--run", name, "--preset", "debug", "--stages", "2", "--addr-file", str(addr), *access]
    group.start(f"bootstrap-{name}", [*argv, "--set", f"train.steps={steps}", *QUICK])
    return group.wait_for_address(addr, timeout=90)


def _iterations(path: Path) -> int:
    return sum(r.get("event") == "iteration" for r in read_jsonl(path))


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_strangers_are_refused_in_one_line_and_the_run_goes_on(tmp_path) -> None:
    group = ProcessGroup(tmp_path)
    key = ["--key", str(tmp_path / "run.key")]
    try:
        peers = _start_run(group, tmp_path, RUN, *key)
        join = ["join", "--run", RUN, "--initial-peers", *peers, *key]
        for stage in (1, 2):
            group.start(f"relay-s{stage}", [*join, "--stage", str(stage)])
        group.wait_for_line(["relay-s1", "relay-s2"], "serving stage", timeout=180)
        metrics = tmp_path / "data-0.jsonl"
        group.start("data-0", [*join, "--role", "data", "--metrics", str(metrics)])
        group.wait_until("the data node's first steps", lambda: _iterations(metrics) >= 2, timeout=180)
        open_peers = _start_run(group, tmp_path, "openrun", "--open")
        (tmp_path / "other.key").write_text(secrets.token_bytes(32).hex())
        strangers = [
            (["--run", RUN, "--initial-peers", *peers, "--key", str(tmp_path / "other.key")], "is not the key of run"),
            (["--run", RUN, "--initial-peers", *peers], "is by invitation: join with --key FILE"),
            (["--run", "openrun", "--initial-peers", *open_peers, *key], "is open: join it without --key"),
        ]
        before = _iterations(metrics)
        for argv, said in strangers:
            # What the refusal takes beyond starting Python and importing torch and transformers (seconds on an idle
            # machine, a minute on one this test shares with busy swarms), measured under the same load.
            startup = _cli("join", "--help")[1]
            done, seconds = _cli("join", *argv, "--join-timeout", "60")
            errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
            assert done.returncode == 2 and len(errors) == 1 and said in errors[0], done.stderr[-2000:]
            assert "Traceback" not in done.stderr
            assert seconds - startup < 15, f"refused after {seconds:.1f}s, {startup:.1f}s of it the start"
        group.wait_until("steps after the strangers", lambda: _iterations(metrics) >= before + 3, timeout=120)
        assert all(p.poll() is None for p in group.procs.values()), group.failed()  # nobody exited or crashed
        for name in group.procs:
            assert "Traceback" not in group.log_text(name), group.log_text(name)[-2000:]
    finally:
        group.stop_all()


# ---- lifecycles ------------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _alive(procs: list[psutil.Process]) -> list[str]:
    """Those of `procs` still running (a zombie has ended; only its parent's reaping is left)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            continue
    return alive


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (alive := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sigkill_of_a_node_leaves_no_helper_process_running(tmp_path) -> None:
    """hivemind's DHT process and p2pd (and torch's shared-memory manager, if one was started) die with the node."""
    group = ProcessGroup(tmp_path)
    try:
        peers = _start_run(group, tmp_path, RUN, "--open")
        relay = group.start("relay", ["join", "--run", RUN, "--initial-peers", *peers, "--stage", "1"])
        group.wait_for_line(["relay"], "serving stage", timeout=180)
        for proc in (relay, group.procs[f"bootstrap-{RUN}"]):
            helpers = _descendants(proc.pid)
            names = {p.name() for p in helpers}
            assert "p2pd" in names and len(helpers) >= 2, names  # the DHT process and its p2pd at least
            os.kill(proc.pid, signal.SIGKILL)  # the main process alone, as an OOM killer or `kill -9 PID` does
            proc.wait(timeout=10)
            assert not _wait_gone(helpers, timeout=10), f"orphans of a SIGKILLed node: {_alive(helpers)}"
    finally:
        group.stop_all()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_sigterm_to_the_demo_stops_every_node(tmp_path) -> None:
    argv = ["demo", "--stages", "2", "--replicas", "1", "--steps", "500", "--crash-at", "-1", "--out", str(tmp_path)]
    log_path = tmp_path.parent / f"{tmp_path.name}-demo.log"
    with open(log_path, "w") as log:
        demo = subprocess.Popen([sys.executable, "-m", "gwtf.launch.cli", *argv], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 200
        while "swarm demo-" not in log_path.read_text() and time.monotonic() < deadline:
            assert demo.poll() is None, log_path.read_text()[-2000:]
            time.sleep(0.5)
        nodes = _descendants(demo.pid)
        while len(nodes) < 4 * 3 and time.monotonic() < deadline:  # on a loaded machine the last helpers come later
            time.sleep(0.5)
            nodes = _descendants(demo.pid)
        assert len(nodes) >= 4 * 3, [p.name() for p in nodes]  # bootstrap, 2 relays, a data node, each with helpers
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 130, log_path.read_text()[-2000:]  # stopped as by Ctrl-C
        assert not _wait_gone(nodes, timeout=15), f"left running after SIGTERM to the demo: {_alive(nodes)}"
    finally:
        if demo.poll() is None:
            demo.kill()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_nodes_exit_0_at_the_runs_end(tmp_path) -> None:
    from gwtf.launch.cli import main

    argv = ["demo", "--stages", "2", "--replicas", "1", "--steps", "4", "--crash-at", "-1", "--out", str(tmp_path)]
    assert main(argv) == 0
    exits = json.loads((tmp_path / "summary.json").read_text())["exits"]
    assert exits == {"bootstrap": 0, "relay-s1-0": 0, "relay-s2-0": 0, "data-0": 0}


# ---- what a volunteer sees -------------------------------------------------------------------------------------


def test_every_flag_of_every_command_has_help_with_its_default() -> None:
    from gwtf.launch.cli import COMMANDS, build_parser, not_given

    for name in COMMANDS:
        parser = build_parser(name)
        command = next(a for a in parser._actions if a.dest == "command").choices[name]
        text = command.format_help()
        for action in command._actions:
            flag = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help, f"gwtf {name} {flag} has no help line"
            if action.option_strings and not not_given(action.default):
                shown = command._get_formatter()._expand_help(action)  # what --help prints for it
                assert "default" in shown, f"gwtf {name} {flag}: the help does not show its default"
        assert "shared/data" not in text  # the region table ships in the package (gwtf/resources/regions.json)


def test_the_data_node_prints_step_loss_tokens_and_replicas() -> None:
    from gwtf.launch.join import step_line

    row = {"iteration": 9, "loss": 4.12341, "tokens_per_s": 5210.4, "live_per_stage": [2, 1], "rerouted": 1, "lost": 0}
    line = step_line(row, total_steps=40)
    assert line.startswith("[#####...............] 10/40  loss 4.1234")
    assert "5210 tok/s" in line and "live per stage [2, 1]" in line and "re-routed 1  lost 0" in line


def test_status_shows_loss_and_addresses_to_hand_out() -> None:
    from gwtf.launch.status import format_status
    from gwtf.membership import NodeRecord

    def node(peer: str, role: str, stage: int, version: int, maddr: str) -> NodeRecord:
        return NodeRecord(peer, role, stage, "serving", 2, 0.1, None, version, True, None, 0.0, 0, maddrs=[maddr])

    nodes = {"relay-1": node("relay-1", "relay", 1, 7, "/ip4/127.0.0.2/tcp/1/p2p/R"),
             "data-a": node("data-a", "data", 0, 7, "/ip4/127.0.0.3/tcp/2/p2p/D")}  # fmt: skip
    history = [{"iteration": 6, "loss": 3.5, "tokens_per_s": 100.0}, {"iteration": 7, "loss": 3.25,
                                                                       "tokens_per_s": 120.0}]  # fmt: skip
    run = RunRecord("r", {"n_stages": 1}, "h", {"run": {"train": {"steps": 40}}})
    text = format_status(run, nodes, {"data-a": {"version": 7, "history": history}})
    head = text.splitlines()[0]
    assert "step 7/40" in head and "loss 3.2500 (step 7)" in head and "120 tok/s" in head
    assert text.splitlines()[-3:] == ["join through any live node (--initial-peers):",
                                      "  /ip4/127.0.0.3/tcp/2/p2p/D", "  /ip4/127.0.0.2/tcp/1/p2p/R"]  # fmt: skip


# ---- joiners spread --------------------------------------------------------------------------------------------


def test_four_volunteers_arriving_together_on_two_stages_end_two_and_two() -> None:
    """In process (the in-memory membership, as a DHT would share it): four volunteers without --stage, started at
    once on a run whose stages are empty, each announcing its choice before it loads."""
    import asyncio
    from collections import Counter

    from gwtf.membership import InMemoryMembership
    from gwtf.placement import place_volunteer

    async def main() -> list[int]:
        store = InMemoryMembership.shared_store()

        async def records() -> dict:  # no relay has a record yet: they are all still placing themselves
            return {}

        async def volunteer(peer: str, delay: float) -> int:
            await asyncio.sleep(delay)
            return await place_volunteer(InMemoryMembership(store, RUN, peer), peer, 2, records, settle_s=0.3)

        return list(await asyncio.gather(*(volunteer(f"v{i}", 0.01 * i) for i in range(4))))

    stages = asyncio.run(main())
    assert Counter(stages) == {1: 2, 2: 2}, stages


def test_a_killed_volunteers_choice_does_not_keep_its_stage_looking_taken() -> None:
    """Stage 3's two joiners announced it, then were killed (their choices live on for CHOICE_TTL_S). A volunteer
    arriving next must take stage 3, the one with no replica, not count the dead joiners there; a choice whose
    volunteer still answers keeps counting."""
    import asyncio

    from gwtf.membership import InMemoryMembership
    from gwtf.placement import place_volunteer

    async def main(dead: set[str]) -> int:
        store = InMemoryMembership.shared_store()
        for peer in ("k1", "k2"):  # the killed joiners' choices, still in the DHT
            InMemoryMembership(store, RUN, peer).announce_choice({"stage": 3, "since": 1.0, "final": True}, 60.0)
        records = {"a": serving_relay("a", 1, version=3), "b": serving_relay("b", 2, version=3)}  # stage 3: none left

        async def live() -> dict:
            return dict(records)

        async def gone(peers: set[str]) -> set[str]:
            return peers & dead

        return await place_volunteer(InMemoryMembership(store, RUN, "new"), "new", 3, live, settle_s=0.05, gone=gone)

    assert asyncio.run(main(dead={"k1", "k2"})) == 3
    assert asyncio.run(main(dead=set())) == 1  # two volunteers loading stage 3 (alive): stage 1 is the emptiest


def test_a_volunteer_counts_serving_relays_and_final_choices() -> None:
    from gwtf.placement import assign

    serving = {"r1": serving_relay("r1", 1, version=3)}
    choices = {
        "late": {"stage": 1, "since": 20.0},
        "settled": {"stage": 2, "since": 30.0, "final": True},  # final: counted where it said, whatever its time
        "early": {"stage": 1, "since": 10.0},
        "r1": {"stage": 1, "since": 1.0},  # has a record now: counted through it, not twice
    }
    assert assign(serving, choices, 3) == {"settled": 2, "early": 3, "late": 1}  # then all equal: the lowest


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_four_volunteers_started_together_spread_over_two_stages(tmp_path) -> None:
    group = ProcessGroup(tmp_path)
    try:
        peers = _start_run(group, tmp_path, RUN, "--open")
        names = [f"volunteer-{i}" for i in range(4)]
        for name in names:
            group.start(name, ["join", "--run", RUN, "--initial-peers", *peers])
        group.wait_for_line(names, "serving stage", timeout=300)
        stages = sorted(int(group.log_text(n).split("serving stage ")[-1].split()[0]) for n in names)
        assert stages == [1, 1, 2, 2], {n: group.log_text(n)[-500:] for n in names}
    finally:
        group.stop_all()


def test_a_standby_takes_a_lost_replica_not_a_read_that_missed_one() -> None:
    import asyncio

    from gwtf.launch.join import LOSS_CONFIRM_READS, wait_for_a_loss

    full = {p: serving_relay(p, k, version=0) for p, k in (("a", 1), ("b", 1), ("c", 2), ("d", 2))}
    missed = {p: r for p, r in full.items() if p != "a"}

    class Reads:  # what membership.live_nodes returns, read after read (the last one again and again)
        def __init__(self, *reads):
            self.reads, self.count = list(reads), 0

        def live_nodes(self):
            self.count += 1
            read = self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]
            if isinstance(read, Exception):
                raise read
            return read

    async def first_loss(reads: Reads, limit: float = 1.0):
        try:
            return await asyncio.wait_for(wait_for_a_loss(reads, 2, poll_s=0.01), limit)
        except TimeoutError:
            return None

    # A read that missed "a" once, then a read that failed (a DHT timeout): neither is a loss, and the standby goes on.
    reads = Reads(full, missed, TimeoutError("get timed out"), full)
    assert asyncio.run(first_loss(reads)) is None and reads.count > 4
    # "c" is missing from LOSS_CONFIRM_READS reads in a row: stage 2 lost a replica.
    gone_c = {p: r for p, r in full.items() if p != "c"}
    assert asyncio.run(first_loss(Reads(full, *[gone_c] * LOSS_CONFIRM_READS))) == 2


# ---- no single point of failure --------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_after_the_bootstrap_is_sigkilled_a_volunteer_joins_through_a_relay(tmp_path) -> None:
    group = ProcessGroup(tmp_path)
    try:
        peers = _start_run(group, tmp_path, RUN, "--open")
        for stage in (1, 2):
            group.start(f"relay-s{stage}", ["join", "--run", RUN, "--initial-peers", *peers, "--stage", str(stage)])
        group.wait_for_line(["relay-s1", "relay-s2"], "serving stage", timeout=240)
        time.sleep(6)  # the bootstrap stores the run record again once it sees them (it polls every 2 s)
        group.kill(f"bootstrap-{RUN}")
        relay_addr = group.log_text("relay-s1").split("join through this node: --initial-peers ")[1].split()[0]
        status, _ = _cli("status", "--run", RUN, "--initial-peers", relay_addr)
        assert status.returncode == 0 and "join through any live node" in status.stdout, status.stderr[-2000:]
        group.start("newcomer", ["join", "--run", RUN, "--initial-peers", relay_addr, "--stage", "2"])
        group.wait_for_line(["newcomer"], "serving stage 2", timeout=240)
    finally:
        group.stop_all()


def test_a_new_data_node_takes_stage0_and_the_step_from_the_relays_copy() -> None:
    """The only data node crashes after step 3; a new one takes stage 0 and the step from stage 1's replicas, and
    the run goes on exactly as it would have (the same losses as an uncrashed run)."""
    import asyncio

    from gwtf.runtime.assembly import make_data_node
    from gwtf.runtime.node import NodeBase
    from tests.support import InProcessSwarm
    from tests.test_swarm_inprocess import fast_swarm, small_config

    async def losses(crash_after: int | None) -> tuple[list[float], int | None]:
        swarm = InProcessSwarm(small_config(steps=6, stages=2), replicas=[2, 1], settings=fast_swarm())
        await swarm.start()
        taken_at = None
        try:
            out = []
            for step in range(6):
                out.append((await swarm.step()).loss)
                if step == crash_after:  # gone at once, no goodbye: its record expires
                    old = swarm.data_nodes.pop()
                    await asyncio.shield(old.copying)  # its copy of stage 0 has reached the keepers (background)
                    swarm.network.crash(old.peer_id)
                    await NodeBase.close(old)
                    await asyncio.sleep(1.0)  # past the record's time to live (0.6 s)
                    new = make_data_node(swarm.spec, swarm._transport("data-new"), swarm._membership("data-new"),
                                         swarm._options("data-new"), 0, swarm.data)  # fmt: skip
                    await new.start(expected_data_nodes=1, timeout=30)
                    taken_at = new.iteration
                    swarm.data_nodes.append(new)
            return out, taken_at
        finally:
            await swarm.close()

    reference, _ = asyncio.run(asyncio.wait_for(losses(None), timeout=100))
    crashed, taken_at = asyncio.run(asyncio.wait_for(losses(3), timeout=100))
    assert taken_at == 4  # the step after the last one the lost data node finished
    assert crashed == pytest.approx(reference, abs=1e-5)


def test_the_copy_of_stage0_is_handed_on_off_the_steps_path_and_a_lagging_one_still_resumes() -> None:
    """Keepers that take 1.5 s per part: the steps do not wait for the copy (each step's copy is skipped while the last
    is on its way). The data node dies; the new one takes the newest whole copy, older than the relays' step, and
    takes their step without the updates in between: the run goes on, at the relays' step, its loss still falling."""
    import asyncio
    import time

    from gwtf.faults import FaultInjector, MessageFault
    from gwtf.runtime.assembly import make_data_node
    from gwtf.runtime.node import NodeBase
    from tests.support import InProcessSwarm
    from tests.test_swarm_inprocess import fast_swarm, small_config

    async def go():
        swarm = InProcessSwarm(small_config(steps=10, stages=2), replicas=[1, 1], settings=fast_swarm())
        await swarm.start()
        try:
            data = swarm.data_nodes[0]
            data.faults = FaultInjector([], messages=[MessageFault("*", -1, "keep_stage0", "delay", 1.5)] * 40)
            losses = [(await swarm.step()).loss for _ in range(2)]
            await asyncio.shield(data.copying)  # one copy has reached the keepers
            t0 = time.monotonic()
            for _ in range(4):
                losses.append((await swarm.step()).loss)
            fast = time.monotonic() - t0 < 4 * 1.5  # a step that waited for its copy would take 1.5 s or more
            skipped, relays_at = data.copies["skipped"], data.iteration
            old = swarm.data_nodes.pop()
            swarm.network.crash(old.peer_id)
            await NodeBase.close(old)
            await asyncio.sleep(1.0)  # past the record's time to live (0.6 s)
            kept = max(k.stage0_keeper.copy.version for k in swarm.relays.values() if k.stage0_keeper.copy)
            new = make_data_node(swarm.spec, swarm._transport("data-new"), swarm._membership("data-new"),
                                 swarm._options("data-new"), 0, swarm.data)  # fmt: skip
            await new.start(expected_data_nodes=1, timeout=30)
            swarm.data_nodes.append(new)
            taken_at = new.iteration
            for _ in range(3):
                losses.append((await swarm.step()).loss)
            return fast, skipped, relays_at, kept, taken_at, losses
        finally:
            await swarm.close()

    fast, skipped, relays_at, kept, taken_at, losses = asyncio.run(asyncio.wait_for(go(), timeout=100))
    assert fast and skipped >= 2, (fast, skipped)
    assert kept < relays_at and taken_at == relays_at, (kept, relays_at, taken_at)  # the copy lagged; the step goes on
    assert losses[-1] < losses[0] - 0.3 and all(x == x for x in losses), losses


def test_at_the_last_step_the_keepers_are_handed_the_final_stage0_and_nothing_streams_on() -> None:
    """Slow keepers skip steps' copies; at the run's end the data node awaits the copy on its way and hands on the
    final version, so a stopped run resumes from its nodes at its last step and an export after "done" reads edge
    relays that stream nothing (at SmolLM2 size an export competing with a 340 MB copy timed out)."""
    import asyncio

    from gwtf.faults import FaultInjector, MessageFault
    from tests.support import InProcessSwarm
    from tests.test_swarm_inprocess import fast_swarm, small_config

    async def go():
        swarm = InProcessSwarm(small_config(steps=4, stages=2), replicas=[1, 1], settings=fast_swarm())
        await swarm.start()
        try:
            data = swarm.data_nodes[0]
            data.faults = FaultInjector([], messages=[MessageFault("*", -1, "keep_stage0", "delay", 0.5)] * 40)
            for _ in range(4):
                await swarm.step()
            skipped, lagging = data.copies["skipped"], not data.copying.done()
            handed = await data.hand_on_last_copy()
            kept = {k.stage0_keeper.copy.version for k in swarm.relays.values()}
            return skipped, lagging, handed, data.stage0.version, kept, data.copying.done()
        finally:
            await swarm.close()

    skipped, lagging, handed, final, kept, settled = asyncio.run(asyncio.wait_for(go(), timeout=60))
    assert skipped >= 1 and lagging, (skipped, lagging)  # the last step's copy was not the final one
    assert handed == final and kept == {final} and settled, (handed, final, kept)


def test_a_relay_full_of_a_dead_data_nodes_microbatches_serves_the_new_one() -> None:
    """The only data node dies mid-step: the relays still hold its microbatches, so the new data node's found no
    room until the relays stepped, and its first step was lost. A full relay drops what it holds for data nodes whose
    record expired."""
    import asyncio

    import torch

    from gwtf.stage import Held
    from tests.support import InProcessSwarm
    from tests.test_swarm_inprocess import fast_swarm, small_config

    async def go() -> list:
        swarm = InProcessSwarm(small_config(steps=4, stages=2), replicas=[1, 1], settings=fast_swarm())
        await swarm.start()
        try:
            for relay in swarm.relays.values():  # full of a data node that is gone (it never had a record)
                for mb in range(relay.replica.capacity):
                    x = torch.zeros(1, requires_grad=True)
                    relay.replica.held[("gone", mb, 0)] = Held(x, x * 2)
            result = await swarm.step()
            assert all(not any(k[0] == "gone" for k in r.replica.held) for r in swarm.relays.values())
            return result.reports
        finally:
            await swarm.close()

    reports = asyncio.run(asyncio.wait_for(go(), timeout=60))
    assert all(r.lost == 0 for r in reports), reports


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stop", ["sigkill", "ctrl-c"])
def test_the_only_data_node_sigkilled_at_step_10_a_new_one_finishes_the_run(tmp_path, stop) -> None:
    """The run's only data node dies (SIGKILL), or its volunteer stops it on purpose (Ctrl-C: SIGINT to its process
    group, as a terminal sends it); the relays keep serving, and a data node started later resumes the run from them:
    stage 0 and the step from stage 1's copy, the step count and the loss going on."""
    group = ProcessGroup(tmp_path, ok_exits=(0, -9, -15, 130))  # 130: the data node interrupted on purpose
    try:
        # 80 steps: an idle machine ran the 20 steps after step 10 of a 30-step run in 2 s, and the data node had
        # finished (exit 0) before the Ctrl-C reached it
        peers = _start_run(group, tmp_path, RUN, "--open", steps=80)
        join = ["join", "--run", RUN, "--initial-peers", *peers]
        for stage in (1, 2):
            group.start(f"relay-s{stage}", [*join, "--stage", str(stage)])
        group.wait_for_line(["relay-s1", "relay-s2"], "serving stage", timeout=240)
        first, second = tmp_path / "data-0.jsonl", tmp_path / "data-1.jsonl"
        group.start("data-0", [*join, "--role", "data", "--metrics", str(first)])
        group.wait_until("step 10", lambda: _iterations(first) >= 10, timeout=240, poll_s=0.05)
        if stop == "sigkill":
            group.kill("data-0")  # the run's only data node, stage 0 with it
        else:
            os.killpg(os.getpgid(group.procs["data-0"].pid), signal.SIGINT)
            assert group.procs["data-0"].wait(timeout=60) == 130
        group.start("data-1", [*join, "--role", "data", "--metrics", str(second)])
        done = lambda: any(r.get("event") == "done" for r in read_jsonl(second))  # noqa: E731
        group.wait_until("the new data node's last step", done, timeout=400)
        before = [r for r in read_jsonl(first) if r.get("event") == "iteration"]
        after = [r for r in read_jsonl(second) if r.get("event") == "iteration"]
        steps = [r["iteration"] for r in after]
        assert steps == list(range(len(before), 80)) or steps == list(range(len(before) + 1, 80)), steps
        resumed = next(r for r in after if r["loss"] > 0)  # a step whose microbatches were all lost reports 0
        assert resumed["loss"] < before[0]["loss"] - 0.2, (before[0], resumed)  # training went on, not restarted
        assert resumed["loss"] < before[-1]["loss"] + 0.2
    finally:
        group.stop_all()


CHILD = """
import multiprocessing, os, signal, subprocess, sys, time
from gwtf import lifecycle
lifecycle.install()
def helper(queue):  # as hivemind's DHT process starts p2pd
    queue.put(subprocess.Popen(["sleep", "300"]).pid)
    time.sleep(300)
queue = multiprocessing.get_context("fork").Queue()
child = multiprocessing.get_context("fork").Process(target=helper, args=(queue,), daemon=True)
child.start()
print(child.pid, queue.get(timeout=30), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_forked_helper_and_what_it_started_end_when_the_node_is_sigkilled() -> None:
    """Fast-tier twin of the process test above: gwtf.lifecycle's watchdog in a forked child (as hivemind's DHT
    process) SIGKILLs what the child started (as p2pd) and exits once its parent is SIGKILLed."""
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    helpers = [psutil.Process(int(pid)) for pid in done.stdout.split()]
    assert not _wait_gone(helpers, timeout=10), f"orphans: {_alive(helpers)}"


DHT_CHILD = """
import os, signal
from gwtf import lifecycle
from gwtf.membership import make_dht
lifecycle.install()
dht = make_dht(None)
print(dht._node.p2p._child.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_nodes_p2p_daemon_ends_when_the_node_is_sigkilled_and_a_clean_stop_leaves_no_child() -> None:
    """The DHT runs on a thread of the node (gwtf.dht): its p2pd is the node's child, and the watchdog from
    gwtf.lifecycle.end_with_this_process SIGKILLs it once the node is gone. A clean shutdown ends p2pd and reaps
    the watchdog."""
    done = subprocess.run([sys.executable, "-c", DHT_CHILD], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    p2pd = psutil.Process(int(done.stdout.split()[0]))  # still there: its parent was SIGKILLed a moment ago
    assert not _wait_gone([p2pd], timeout=10), f"orphan: {_alive([p2pd])}"

    before = set(psutil.Process().children(recursive=True))
    dht = make_dht(None)
    started = set(psutil.Process().children(recursive=True)) - before
    assert sorted(p.name() for p in started) == ["p2pd", "sh"]  # the daemon and its watchdog
    dht.shutdown()
    dht.shutdown()  # idempotent
    assert not _alive(list(started)), _alive(list(started))
    with pytest.raises(RuntimeError, match="shut down"):
        dht.get("gwtf/anything")


REFUSED = """
import secrets, sys
from gwtf.auth import RunAccess
from gwtf.errors import UserError
from gwtf.membership import DHTMembership, NodeRecord, RunRecord, check_invitation, dht_addresses, make_dht
access = RunAccess("vol", secrets.token_bytes(32))
owner = make_dht(None, access=access)
DHTMembership(owner, "vol").publish_run(RunRecord("vol", {}, "h", {}, key_id=access.key_id))
try:
    check_invitation(dht_addresses(owner), RunAccess("vol", secrets.token_bytes(32)), timeout=5)
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
if sys.argv[1] == "shutdown":
    owner.shutdown()
"""


@pytest.mark.parametrize("end", ["shutdown", "exit without shutdown"])
def test_a_refused_joiner_says_one_line_whether_or_not_its_dht_was_shut_down(end: str) -> None:
    """A DHT on a thread leaves no pending task behind to be logged at exit ("Task was destroyed but it is
    pending!": a refused joiner printed three such lines after its one-line error), shut down or not (atexit)."""
    done = subprocess.run([sys.executable, "-c", REFUSED, end.split()[0]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr.strip().splitlines() == [
        "error: this key is not the key of run 'vol'; ask its owner for the right key file"
    ], done.stderr[-2000:]


def test_the_demos_last_line_says_what_was_asked_and_what_happened() -> None:
    import argparse

    from gwtf.launch.local_swarm import outcome

    mb = {"started": 16, "finished": 16, "rerouted": 0, "partial": 0, "lost": 0}
    summary = {"ok": True, "steps": 4, "first_loss": 5.5, "last_loss": 5.0, "microbatches": mb, "crash": {},
               "failed_processes": [], "exits": {"bootstrap": 0, "relay-s1-0": 0, "data-0": 0}}  # fmt: skip
    quiet = argparse.Namespace(steps=4, crash_at=-1, crash_stage=1, crash_phase="backward")
    line = outcome(quiet, summary)
    assert line == ("done: 4/4 steps, loss 5.500 -> 5.000; microbatches 16/16 finished, 0 re-routed, 0 lost; "
                    "no crash asked; 3 nodes exited 0 by themselves at the run's end")  # fmt: skip
    asked = argparse.Namespace(steps=4, crash_at=2, crash_stage=1, crash_phase="backward")
    assert "crash asked: stage 1 during backward of step 2, and it did not happen" in outcome(asked, summary)
    crashed = {**summary, "crash": {"served_at_step": 3}, "exits": {"relay-s1-0": -9, "data-0": None}}
    line = outcome(asked, crashed)
    assert "recovered: the standby volunteer serves since step 3" in line and "(stopped): data-0" in line
    # The router left the replica idle: the demo killed it, and says so; a node that failed after the end is named.
    killed = {**crashed, "crash": {"served_at_step": 6, "step": 5, "phase": "killed by the demo (the router left it "
                                   "idle)"}, "exits": {"relay-s1-0": -9, "joiner-0": 1}}  # fmt: skip
    line = outcome(asked, killed)
    assert "(left unrouted; the demo killed it at step 5), recovered" in line
    assert "exited with an error: joiner-0" in line


def test_a_child_the_group_stopped_that_ends_interrupted_has_not_failed(tmp_path) -> None:
    """A node maps SIGTERM to Ctrl-C and exits 130 ("interrupted"): after `stop_all` that is the stop, not a failure
    (a harness run whose data node was still closing when it was stopped was marked failed); a child that exits 130
    without being stopped has failed."""
    on_term = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(130)); time.sleep(60)"
    group = ProcessGroup(tmp_path)
    try:
        group.start("node", [], entry=("-c", on_term))
        group.start("quitter", [], entry=("-c", "import sys; sys.exit(130)"))
        group.procs["quitter"].wait(timeout=30)
        time.sleep(0.5)  # the node's handler is installed
    finally:
        group.stop_all()
    assert group.procs["node"].returncode == 130
    assert group.failed() == ["quitter"]
