"""Joining by invitation: run keys, proofs on every call, refused outsiders, records bound to libp2p peer ids."""

import asyncio
import os
import secrets
import subprocess
import sys
import time

import pytest
import torch

from gwtf.auth import RunAccess, bootstrap_access, check_run_access, create_key, load_key
from gwtf.errors import PeerError, UserError
from gwtf.membership import DHTMembership, NodeRecord, RunRecord, dht_addresses, make_dht
from gwtf.transport import HivemindTransport, InProcessNetwork, InProcessTransport, Message
from tests.support import InProcessSwarm
from tests.test_swarm_inprocess import fast_swarm, small_config

RUN = "inv"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def keyed() -> RunAccess:
    return RunAccess(RUN, secrets.token_bytes(32))


def node_record(peer_id: str) -> NodeRecord:
    return NodeRecord(peer_id, "relay", 1, "serving", 2, 0.1, None, 0, True, None, 0.0, 0)


def test_key_file_created_loaded_and_checked(tmp_path) -> None:
    path = tmp_path / "run.key"
    access = bootstrap_access(RUN, str(path), open_run=False)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_key(path) == access.key
    assert bootstrap_access(RUN, str(path), open_run=False) == access  # an existing key is taken, not replaced
    with pytest.raises(UserError, match="already exists"):
        create_key(path)
    (tmp_path / "bad.key").write_text("nothex")
    with pytest.raises(UserError, match="not a run key"):
        load_key(tmp_path / "bad.key")
    (tmp_path / "binary.key").write_bytes(bytes(range(256)))  # a corrupt file: not even text
    with pytest.raises(UserError, match="binary.key is not a run key"):
        load_key(tmp_path / "binary.key")
    with pytest.raises(UserError, match="exclude"):
        bootstrap_access(RUN, str(path), open_run=True)
    check_run_access(access, access.key_id)
    with pytest.raises(UserError, match="by invitation: join with --key"):
        check_run_access(RunAccess.open(RUN), access.key_id)
    with pytest.raises(UserError, match="not the key"):
        check_run_access(keyed(), access.key_id)
    with pytest.raises(UserError, match="is open"):
        check_run_access(access, "")


def test_proofs_are_bound_to_sender_receiver_and_run() -> None:
    access = keyed()
    proof = access.proof("A", "B")
    access.check("A", "B", proof)
    for sender, receiver, p in [("C", "B", proof), ("A", "C", proof), ("A", "B", None), ("A", "B", "x" * 64)]:
        with pytest.raises(Exception, match="unauthorized"):
            access.check(sender, receiver, p)
    with pytest.raises(Exception, match="unauthorized"):
        RunAccess("other", access.key).check("A", "B", proof)
    RunAccess.open(RUN).check("A", "B", None)  # an open run asks nothing


def test_in_process_outsiders_are_refused_both_ways() -> None:
    async def main() -> None:
        access, net, served = keyed(), InProcessNetwork(), []
        a = InProcessTransport(net, "a", RUN, access=access)
        b = InProcessTransport(net, "b", RUN, access=access)
        stranger = InProcessTransport(net, "stranger", RUN)  # no key
        forger = InProcessTransport(net, "forger", RUN, access=keyed())  # a key, but not the run's

        async def echo(msg: Message) -> Message:
            served.append(msg.sender)
            return Message("echo", RUN, tensors=[t * 2 for t in msg.tensors])

        for t in (a, b, stranger, forger):
            t.add_handler("echo", echo)
        msg = Message("x", RUN, tensors=[torch.ones(3)])
        assert torch.equal((await a.call("b", "echo", msg, timeout=5)).tensors[0], torch.full((3,), 2.0))
        for outsider in (stranger, forger):
            with pytest.raises(PeerError, match="rejected: unauthorized: .* join with --key"):
                await outsider.call("a", "echo", msg, timeout=5)
            with pytest.raises(PeerError, match="unauthorized"):  # a member takes nothing from outsiders
                await a.call(outsider.peer_id, "echo", msg, timeout=5)
        assert served == ["a", "a"]  # b served a; the stranger answered a (refused as a bad reply); no member served
        # an outsider
        assert a.rejected == 2

    run(main())


class KeyedSwarm(InProcessSwarm):
    """The in-process swarm with every member's transport holding the run key."""

    access: RunAccess

    def _transport(self, name: str) -> InProcessTransport:
        return InProcessTransport(self.network, name, self.run_id, access=self.access)


def test_outsider_gets_no_activations_weights_or_averaging_slot() -> None:
    async def main() -> None:
        swarm = KeyedSwarm(small_config(steps=3, stages=2), settings=fast_swarm(), run_id=RUN)
        swarm.access = keyed()
        await swarm.start()
        try:
            await swarm.step()
            relay = next(iter(swarm.relays.values()))
            outsider = InProcessTransport(swarm.network, "outsider", RUN)
            version = relay.replica.version
            route = [relay.peer_id if s == relay.stage else "x" for s in range(1, 3)]
            x = torch.zeros(4, swarm.spec.model.seq_len, swarm.spec.model.d_model)
            calls = [
                ("get_state", Message("state", RUN, meta={"names": None})),
                ("forward", Message("forward", RUN, iteration=version, tensors=[x], meta={"route": route})),
                (f"avg_stage{relay.stage}", Message("avg", RUN, iteration=version, tensors=[], meta={"count": 1})),
                ("head", Message("head", RUN, iteration=version, tensors=[x])),
            ]
            for name, msg in calls:
                target = swarm.data_nodes[0].peer_id if name == "head" else relay.peer_id
                with pytest.raises(PeerError, match="rejected: unauthorized"):
                    await outsider.call(target, name, msg, timeout=5)
            assert relay.replica.version == version and not relay.replica.held
            await swarm.step()  # the members go on training
        finally:
            await swarm.close()

    run(main())


def test_dht_records_need_the_key_and_are_bound_to_peer_ids() -> None:
    access = keyed()
    owner = make_dht(None, access=access)
    member = stranger = None
    try:
        run_record = RunRecord(RUN, {}, "h", {}, key_id=access.key_id)
        owner_m = DHTMembership(owner, RUN)
        owner_m.publish_run(run_record)
        assert owner_m.peer_id == owner.peer_id.to_base58()  # the record key is the libp2p identity
        member = make_dht(dht_addresses(owner), access=access)
        stranger = make_dht(dht_addresses(owner), access=RunAccess.open(RUN))
        member_m, stranger_m = DHTMembership(member, RUN), DHTMembership(stranger, RUN)
        member_m.announce(node_record(member_m.peer_id), ttl=30)
        # the stranger can read the run record (and so learn that it needs a key) but cannot write records
        seen = stranger_m.get_run(timeout=5)
        assert seen is not None and seen.key_id == access.key_id
        with pytest.raises(UserError, match="by invitation"):
            check_run_access(RunAccess.open(RUN), seen.key_id)
        with pytest.raises(RuntimeError, match="refused"):
            stranger_m.announce(node_record(stranger_m.peer_id), ttl=30)
        # a member cannot speak for another peer: refused locally, and ignored by readers if forced into the DHT
        with pytest.raises(PermissionError):
            member_m.announce(node_record(owner_m.peer_id), ttl=30)
        assert set(owner_m.live_nodes()) == {member_m.peer_id}
        member_m._store(member_m._nodes_key, node_record(owner_m.peer_id).to_dict(), ttl=30)  # under its own subkey
        assert owner_m.live_nodes() == {}
    finally:
        for dht in (stranger, member, owner):
            if dht is not None:
                dht.shutdown()


def test_hivemind_transport_refuses_outsiders_on_p2p_and_direct_tcp() -> None:
    async def main() -> None:
        from hivemind.p2p import P2P

        from gwtf.membership import LOOPBACK_KW

        access = keyed()
        p2ps = [await P2P.create(**LOOPBACK_KW)]
        p2ps += [await P2P.create(initial_peers=await p2ps[0].get_visible_maddrs(), **LOOPBACK_KW) for _ in range(2)]
        server = await HivemindTransport.create(p2ps[0], RUN, access=access, direct_tcp_min_bytes=1024)
        member = await HivemindTransport.create(p2ps[1], RUN, access=access, direct_tcp_min_bytes=1024)
        stranger = await HivemindTransport.create(p2ps[2], RUN, direct_tcp_min_bytes=1024)

        async def echo(msg: Message) -> Message:
            return Message("echo", RUN, tensors=msg.tensors)

        server.add_handler("echo", echo)
        try:
            for size in (4, 4096):  # P2P stream, direct TCP
                msg = Message("x", RUN, tensors=[torch.ones(size)])
                assert torch.equal(
                    (await member.call(server.peer_id, "echo", msg, timeout=10)).tensors[0], torch.ones(size)
                )
                with pytest.raises(PeerError, match="rejected: unauthorized"):
                    await stranger.call(server.peer_id, "echo", msg, timeout=10)
            assert member._direct.idle.get(server.peer_id)  # the big message took the direct TCP path
        finally:
            for t in (server, member, stranger):
                await t.shutdown()
            for p in p2ps:
                await p.shutdown()

    run(main())


@pytest.mark.slow  # two CLI processes and a join timeout: ~30 s on an idle machine
@pytest.mark.timeout(180)
def test_cli_join_without_or_with_a_wrong_key_is_refused_in_one_line(tmp_path) -> None:
    from gwtf.launch.local_swarm import ProcessGroup

    group = ProcessGroup(tmp_path)
    addr = tmp_path / "addr.txt"
    try:
        group.start("bootstrap", ["bootstrap", "--run", RUN, "--preset", "debug", "--stages", "2",
                                  "--key", str(tmp_path / "run.key"), "--addr-file", str(addr)])  # fmt: skip
        deadline = time.monotonic() + 60
        while not (addr.exists() and addr.read_text().strip()) and time.monotonic() < deadline:
            assert not group.failed(), (tmp_path / "bootstrap.log").read_text()
            time.sleep(0.1)
        join = ["join", "--run", RUN, "--initial-peers", *addr.read_text().split(), "--join-timeout", "60"]
        (tmp_path / "other.key").write_text(secrets.token_bytes(32).hex())
        wrong_key = ["--key", str(tmp_path / "other.key")]
        for extra, expected in [([], "is by invitation: join with --key FILE"),
                                (wrong_key, f"this key is not the key of run {RUN!r}")]:  # fmt: skip
            # (the wrong key's DHT peer drops the run's records as forgeries; a keyless probe reads the run's key id)
            t0 = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "gwtf.launch.cli", *join, *extra], capture_output=True,
                                  text=True, timeout=90, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
            assert done.returncode == 2, done.stderr[-2000:]
            assert expected in done.stderr and "Traceback" not in done.stderr
            assert time.monotonic() - t0 < 45, "refused well before the 60 s join timeout"
        assert not group.failed(), (tmp_path / "bootstrap.log").read_text()[-2000:]  # the run goes on
    finally:
        group.stop_all()
