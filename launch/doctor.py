"""`gwtf doctor`: can the peers of a run reach this machine? Run it where a volunteer would join, with the same flags.

    gwtf doctor --initial-peers ADDR --run myrun [--key run.key] [--host-maddrs ...] [--announce-maddrs ...]

It finds the run (and checks the key), starts a DHT peer and a transport the way `gwtf join` does, prints where it
listens and what it announces (and whether those are addresses another network can dial), then asks up to three
live nodes of the run to open a direct TCP connection back to it. Each check is one line; the last line says what
to do. Exit 0 if some node reached it directly, 1 if none did (its calls then take libp2p streams), 2 on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress

from gwtf.errors import UserError
from gwtf.launch.network import add_address_arguments, addresses_of

ASK_AT_MOST = 3  # live nodes asked to dial back
ASK_TIMEOUT_S = 15.0  # one dial-back (several announced addresses, each bounded by direct.CONNECT_TIMEOUT_S)


def add_arguments(parser: argparse.ArgumentParser, command: str = "doctor") -> None:
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="ADDR", help="a multiaddr of the run")
    parser.add_argument("--run", required=True, help="run name")
    parser.add_argument("--key", default=None, metavar="FILE", help="the run key (a run by invitation needs it)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to find the run and its nodes")
    add_address_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    from gwtf.auth import join_access
    from gwtf.membership import DHTMembership, check_invitation, make_dht, serving

    addrs = addresses_of(args)
    access = join_access(args.run, args.key)
    await asyncio.to_thread(check_invitation, args.initial_peers, access, args.timeout, loopback=addrs.loopback)
    print(f"run {args.run}: found through {args.initial_peers[0]}{' (key accepted)' if access.keyed else ''}")
    dht = make_dht(args.initial_peers, loopback=addrs.loopback, access=access, **addrs.dht_kwargs())
    try:
        p2p = await dht.replicate_p2p()
        visible = [str(m) for m in await p2p.get_visible_maddrs()]
        print(f"libp2p: announces {' '.join(visible) or 'nothing'}")
        advice = _address_advice(visible, addrs.use_relay)
        if advice:
            print(advice)
        nodes = await _live_nodes(DHTMembership(dht, args.run), args.timeout, serving)
        return await _ask_dial_back(p2p, args, access, addrs, nodes)
    finally:
        dht.shutdown()


async def _live_nodes(membership, timeout: float, serving) -> list[str]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        nodes = await asyncio.to_thread(membership.live_nodes)
        found = [*serving(nodes, "relay"), *serving(nodes, "data")]
        if found or asyncio.get_running_loop().time() > deadline:
            return found[:ASK_AT_MOST]
        await asyncio.sleep(1.0)


async def _ask_dial_back(p2p, args, access, addrs, nodes: list[str]) -> int:
    from gwtf.errors import PeerError
    from gwtf.transport import HivemindTransport

    transport = await HivemindTransport.create(
        p2p, args.run, access=access, tcp_host=addrs.tcp_host, tcp_port=addrs.tcp_port,
        announce_hosts=addrs.announce_hosts,
    )  # fmt: skip
    try:
        endpoint = transport.direct_endpoint
        if endpoint is None:
            raise UserError("this node has no direct TCP path (no IPv4 address): pass --host-maddrs /ip4/ADDR/tcp/0")
        print(f"direct TCP: listens on {addrs.tcp_host or endpoint[0][0]}:{endpoint[1]}, announces "
              f"{', '.join(endpoint[0])} (that port must take inbound TCP)")  # fmt: skip
        if not nodes:
            print("no live node of the run to ask yet: start a relay or a data node, then run doctor again")
            return 1
        reached = 0
        for peer in nodes:
            try:
                answer = await transport.reachable_from(peer, ASK_TIMEOUT_S)
            except PeerError as exc:
                print(f"  {peer[:12]}: could not ask it ({exc})")
                continue
            reached += answer.get("direct") == "ok"
            print(f"  {peer[:12]}: direct TCP {answer.get('direct')}: {answer.get('detail', '')}")
        print(_verdict(reached, len(nodes), endpoint[1], addrs.use_relay))
        return 0 if reached else 1
    finally:
        await transport.shutdown()


def _address_advice(maddrs: list[str], use_relay: bool) -> str:
    ips = [m.split("/")[2] for m in maddrs if m.startswith(("/ip4/", "/ip6/"))]
    if not ips or any(_is_global(ip) for ip in ips):
        return ""
    relay = "" if use_relay else ", or join with --use-relay (a circuit relay carries its libp2p traffic)"
    return (f"libp2p: every announced address is private or loopback: peers on other networks cannot dial it; "
            f"forward a port and pass --announce-maddrs /ip4/PUBLIC_IP/tcp/PORT{relay}")  # fmt: skip


def _is_global(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_global
    except ValueError:
        return False


def _verdict(reached: int, asked: int, port: int, use_relay: bool) -> str:
    if reached:
        return f"ok: {reached} of {asked} node(s) reached this node's direct TCP path"
    relay = " (through a circuit relay with --use-relay)" if not use_relay else ""
    return (f"not reachable directly: no node could connect to TCP port {port}; this node still works over libp2p "
            f"streams{relay}, more slowly. Open or forward that port (or pass --announce-maddrs with the address "
            f"that forwards to it) for the direct path")  # fmt: skip
