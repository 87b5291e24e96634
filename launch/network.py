"""The address flags of `gwtf bootstrap`, `gwtf join` and `gwtf doctor` (hivemind's names and meaning; see
gwtf.transport.addresses): where a node listens, what it announces, relays, `--public`."""

from __future__ import annotations

import argparse

from gwtf.transport.addresses import Addresses


def add_address_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--public", action="store_true",
                        help="NAT traversal on, and all interfaces unless --host-maddrs says where")  # fmt: skip
    parser.add_argument("--host-maddrs", nargs="+", default=[], metavar="MADDR",
                        help="multiaddresses to listen on, e.g. /ip4/0.0.0.0/tcp/31337 (the direct TCP path "
                             "listens on the same address, port 31338; on any free port if the port is 0)")  # fmt: skip
    parser.add_argument("--announce-maddrs", nargs="+", default=[], metavar="MADDR",
                        help="multiaddresses peers should dial, e.g. /ip4/PUBLIC_IP/tcp/31337 behind a port "
                             "forward (the direct TCP path announces the same IPv4 address)")  # fmt: skip
    parser.add_argument("--use-relay", action="store_true",
                        help="reach and be reached through libp2p circuit relays (a volunteer behind NAT)")  # fmt: skip


def addresses_of(args: argparse.Namespace) -> Addresses:
    """The flags as Addresses (a bad multiaddress is a one-line UserError)."""
    return Addresses(list(args.host_maddrs), list(args.announce_maddrs), args.use_relay, args.public)
