"""Addresses across machines, on loopback: nodes that listen on distinct addresses (127.0.0.2, 127.0.0.3, ... stand
for other machines) and announce them train together; a node whose direct TCP port cannot be reached serves over
libp2p streams; the flags mean what hivemind's do; an address lookup that finds nothing never becomes 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from gwtf.errors import PeerError, UserError
from gwtf.launch.cli import build_parser
from gwtf.launch.network import addresses_of
from gwtf.membership import InMemoryMembership
from gwtf.runtime.assembly import make_data_node, module_builder
from gwtf.runtime.relay import RelayNode
from gwtf.runtime.spec import NodeOptions, run_spec
from gwtf.transport import HivemindTransport, Message
from gwtf.transport.addresses import Addresses
from tests.test_swarm_inprocess import fast_swarm, small_config

RUN = "addr-test"


def _join_args(*argv: str):
    return build_parser("join").parse_args(["join", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run", "r", *argv])


def test_public_listens_on_every_interface_with_nat_traversal():
    addrs = addresses_of(_join_args("--public"))
    assert not addrs.loopback
    assert addrs.dht_kwargs() == {"host_maddrs": ["/ip4/0.0.0.0/tcp/0"]}  # hivemind's NAT defaults stay on
    assert addrs.tcp_host == "0.0.0.0" and addrs.announce_hosts is None  # p2p's interface addresses are announced


def test_host_and_announce_maddrs_mean_what_hivemind_says():
    argv = ["--host-maddrs", "/ip4/127.0.0.2/tcp/0", "--announce-maddrs", "/ip4/127.0.0.7/tcp/31337", "--use-relay"]
    addrs = addresses_of(_join_args(*argv))
    assert addrs.loopback  # no --public: no NAT traversal
    assert addrs.dht_kwargs() == {
        "host_maddrs": ["/ip4/127.0.0.2/tcp/0"],
        "announce_maddrs": ["/ip4/127.0.0.7/tcp/31337"],
        "use_relay": True,
        "use_auto_relay": True,
    }
    assert addrs.tcp_host == "127.0.0.2" and addrs.announce_hosts == ["127.0.0.7"]
    assert Addresses(["/ip4/127.0.0.3/tcp/0"]).announce_hosts == ["127.0.0.3"]  # where it listens, by default


def test_a_bad_multiaddress_is_one_line():
    with pytest.raises(UserError, match="--host-maddrs '127.0.0.2:31337' is not a multiaddress"):
        addresses_of(_join_args("--host-maddrs", "127.0.0.2:31337"))


class _NoIPv4:
    """A p2p that announces no IPv4 address (an IPv6-only host)."""

    class peer_id:  # noqa: N801 - stands for hivemind's PeerID
        @staticmethod
        def to_base58() -> str:
            return "QmNoIPv4"

    async def get_visible_maddrs(self):
        from hivemind.utils.multiaddr import Multiaddr

        return [Multiaddr("/ip6/::1/tcp/4001")]

    async def add_binary_stream_handler(self, *_):
        pass

    async def remove_binary_stream_handler(self, *_):
        pass


def test_no_ipv4_address_turns_the_direct_path_off_never_127_0_0_1(caplog):
    async def run() -> None:
        with caplog.at_level(logging.WARNING):
            transport = await HivemindTransport.create(_NoIPv4(), RUN)  # type: ignore[arg-type]
        assert transport.direct_endpoint is None
        assert transport._direct.grant("QmCaller") == {}  # callers are told there is no direct path: P2P
        assert "direct TCP path is off" in caplog.text
        await transport.shutdown()

    asyncio.run(run())


# --- hivemind transports on distinct loopback addresses --------------------------------------------------------


async def _node(host: str, peers: list, announce: list[str] | None = None) -> HivemindTransport:
    from hivemind.p2p import P2P

    addrs = Addresses([f"/ip4/{host}/tcp/0"])
    initial = [m for p in peers for m in await p.p2p.get_visible_maddrs()]
    p2p = await P2P.create(initial_peers=initial, nat_port_map=False, auto_nat=False, use_relay=False,
                           **addrs.dht_kwargs())  # fmt: skip
    return await HivemindTransport.create(p2p, RUN, tcp_host=addrs.tcp_host,
                                          announce_hosts=announce or addrs.announce_hosts)  # fmt: skip


async def _close(*transports: HivemindTransport) -> None:
    for t in transports:
        await t.shutdown()
        await t.p2p.shutdown()


def test_unreachable_direct_port_falls_back_to_libp2p(caplog):
    async def echo(msg: Message) -> Message:
        return Message("r", RUN, tensors=[msg.tensors[0] * 2])

    async def run() -> None:
        server = await _node("127.0.0.2", [], announce=["127.0.0.9"])  # a NAT: nobody listens where it points
        client = await _node("127.0.0.3", [server])
        server.add_handler("echo", echo)
        try:
            assert server.direct_endpoint is not None and server.direct_endpoint[0] == ["127.0.0.9"]
            for _ in range(2):  # the second call goes straight to P2P: the direct path is not retried at once
                with caplog.at_level(logging.WARNING):
                    reply = await client.call(server.peer_id, "echo", Message("f", RUN, tensors=[torch.ones(1 << 18)]),
                                              timeout=10)  # fmt: skip
                assert torch.equal(reply.tensors[0], torch.full((1 << 18,), 2.0))
            assert not client._direct.idle.get(server.peer_id)  # no TCP connection: it went over libp2p
            assert caplog.text.count("no direct TCP path to") == 1  # said once
        finally:
            await _close(client, server)

    asyncio.run(run())


def test_nodes_on_distinct_loopback_addresses_train_together():
    """Two relay stages and a data node, each on its own address; the stage-2 relay's direct port is unreachable
    (it announces 127.0.0.9): every call to it goes over libp2p, every other over the direct path, and the swarm
    trains."""

    async def run() -> list[float]:
        cfg = small_config(steps=6, stages=2)
        from gwtf.config import with_overrides

        cfg = with_overrides(cfg, fast_swarm())
        spec = run_spec(RUN, cfg, 1)
        relay1 = await _node("127.0.0.2", [])
        relay2 = await _node("127.0.0.3", [relay1], announce=["127.0.0.9"])
        data = await _node("127.0.0.4", [relay1, relay2])
        store = InMemoryMembership.shared_store()
        opts = NodeOptions(capacity=4)
        nodes = []
        try:
            for stage, t in ((1, relay1), (2, relay2)):
                node = RelayNode(spec, t, InMemoryMembership(store, RUN, t.peer_id), opts, stage)
                nodes.append(node)
                await node.start(module_builder(spec))
            from gwtf.data import load_data

            dn = make_data_node(spec, data, InMemoryMembership(store, RUN, data.peer_id), opts, 0,
                                load_data(cfg.data, spec.model.seq_len))  # fmt: skip
            nodes.append(dn)
            await dn.start(expected_data_nodes=1, timeout=30)
            losses = []
            for _ in range(6):
                report = await dn.run_iteration()
                assert report.lost == 0 and report.partial == 0, report
                losses.append(sum(report.losses) / len(report.losses))
            # the reachable relay was dialed where it listens; the unreachable one only over libp2p
            conns = data._direct.idle.get(relay1.peer_id) or relay2._direct.idle.get(relay1.peer_id)
            assert conns and conns[0].sock.getpeername()[0] == "127.0.0.2"
            assert not data._direct.idle.get(relay2.peer_id) and not relay1._direct.idle.get(relay2.peer_id)
            return losses
        finally:
            for node in nodes:
                await node.close()
            await _close(data, relay2, relay1)

    losses = asyncio.run(asyncio.wait_for(run(), timeout=120))
    assert losses[-1] < losses[0] - 0.2, losses  # it trains


def test_doctor_dial_back_tells_reachable_from_unreachable():
    from gwtf.launch.doctor import _address_advice, _verdict

    async def run() -> None:
        member = await _node("127.0.0.2", [])
        open_node = await _node("127.0.0.3", [member])
        natted = await _node("127.0.0.4", [member], announce=["127.0.0.9"])
        try:
            ok = await open_node.reachable_from(member.peer_id, timeout=15)
            assert ok == {"direct": "ok", "detail": f"127.0.0.3:{open_node.direct_endpoint[1]}"}
            bad = await natted.reachable_from(member.peer_id, timeout=15)
            assert bad["direct"] == "unreachable" and "127.0.0.9" in bad["detail"]
        finally:
            await _close(natted, open_node, member)

    asyncio.run(run())
    assert "--use-relay" in _address_advice(["/ip4/192.168.1.5/tcp/4001"], use_relay=False)
    assert _address_advice(["/ip4/8.8.8.8/tcp/4001", "/ip4/127.0.0.1/tcp/4001"], use_relay=False) == ""
    assert "port 31338" in _verdict(0, 2, 31338, use_relay=False)


def test_a_fixed_libp2p_port_puts_the_direct_path_on_the_next_one():
    assert Addresses(["/ip4/0.0.0.0/tcp/31337"]).tcp_port == 31338
    assert Addresses(["/ip4/127.0.0.2/tcp/0"]).tcp_port == 0


# --- real processes: `gwtf bootstrap` / `gwtf join` / `gwtf doctor` with the address flags ----------------------


def _at(host: str) -> list[str]:
    return ["--host-maddrs", f"/ip4/{host}/tcp/0"]  # announced as it is (an announced port cannot be 0)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_processes_on_distinct_loopback_addresses_train_and_doctor_reaches_them(tmp_path):
    """bootstrap, two relays and a data node, each listening on and announcing its own address (no --public: no NAT
    traversal, no packet leaves loopback); they train; `gwtf doctor` on yet another address is reached directly."""
    from gwtf.launch.processes import ProcessGroup, read_jsonl

    group = ProcessGroup(tmp_path)
    settings = ["data.max_bytes=300000", "train.microbatch_size=4", "train.microbatches_per_step=4", "train.steps=6",
                "optim.warmup_steps=3"]  # fmt: skip
    try:
        bootstrap = ["bootstrap", "--run", "far", "--preset", "debug", "--stages", "2", "--open", "--router",
                     "round-robin", "--addr-file", str(tmp_path / "addr"), *_at("127.0.0.2")]  # fmt: skip
        group.start("bootstrap", [*bootstrap, *sum((["--set", s] for s in settings), [])])
        peers = group.wait_for_address(tmp_path / "addr", 60)
        assert all(p.startswith("/ip4/127.0.0.2/") for p in peers), peers
        join = ["join", "--run", "far", "--initial-peers", *peers]
        for stage, host in ((1, "127.0.0.3"), (2, "127.0.0.4")):
            group.start(f"relay{stage}", [*join, "--role", "relay", "--stage", str(stage), *_at(host)])
        group.wait_for_line(["relay1", "relay2"], "serving stage", 120)
        doctor = main_output(["doctor", "--run", "far", "--initial-peers", *peers, *_at("127.0.0.6")])
        assert doctor[0] == 0 and "direct TCP ok: 127.0.0.6:" in doctor[1], doctor[1]
        metrics = tmp_path / "data0.jsonl"
        group.start("data0", [*join, "--role", "data", "--metrics", str(metrics), *_at("127.0.0.5")])
        group.wait_until("the data node's 6 steps", lambda: metrics.exists() and any(
            r.get("event") == "done" for r in read_jsonl(metrics)), 200)  # fmt: skip
        losses = [r["loss"] for r in read_jsonl(metrics) if r.get("event") == "iteration"]
        assert len(losses) == 6 and losses[-1] < losses[0], losses
        assert "127.0.0.4" in group.log_text("relay2") and "no direct TCP path" not in group.log_text("data0")
    finally:
        group.stop_all()


def main_output(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from gwtf.launch.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_a_peer_reached_before_that_refuses_now_fails_fast_then_p2p_serves():
    """Refused where it answered before: gone (a crash), so the call fails at once instead of waiting on libp2p for a
    dead peer; a peer whose P2P still answers is then called over P2P."""

    async def echo(msg: Message) -> Message:
        return Message("r", RUN, tensors=msg.tensors)

    async def run() -> None:
        server = await _node("127.0.0.2", [])
        client = await _node("127.0.0.3", [server])
        server.add_handler("echo", echo)
        big = Message("f", RUN, tensors=[torch.ones(1 << 16)])
        try:
            await client.call(server.peer_id, "echo", big, timeout=10)  # over the direct path
            await server._direct.close()  # its direct listener dies; its P2P lives on
            with pytest.raises(PeerError, match="unreachable"):
                await client.call(server.peer_id, "echo", big, timeout=10)
            reply = await client.call(server.peer_id, "echo", big, timeout=10)  # asked again: refused, P2P
            assert torch.equal(reply.tensors[0], big.tensors[0])
        finally:
            await _close(client, server)

    asyncio.run(run())
