"""Where a node listens and what it announces: `--host-maddrs`, `--announce-maddrs`, `--use-relay`, `--public`, in
hivemind's names and meaning, turned into the DHT's options and the direct TCP path's listen and announced hosts.

    host_maddrs      multiaddresses libp2p listens on (`/ip4/0.0.0.0/tcp/31337`: every interface, port 31337);
                     the direct TCP path listens on the same IPv4 address, on the next port (31338) when the
                     port is fixed (so one forwarding rule covers both), on any free port otherwise
    announce_maddrs  the multiaddresses peers should dial (a public address in front of a NAT or port forward);
                     the direct TCP path announces the same IPv4 addresses
    use_relay        libp2p circuit relays: a node that takes no inbound connection is reached through one
    public           NAT traversal on, and, without host_maddrs, listening on every interface (`/ip4/0.0.0.0/tcp/0`)

Without `public` the node stays on loopback (membership.LOOPBACK_KW) unless host_maddrs says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gwtf.errors import UserError

ALL_INTERFACES = "/ip4/0.0.0.0/tcp/0"


@dataclass(frozen=True)
class Addresses:
    host_maddrs: list[str] = field(default_factory=list)
    announce_maddrs: list[str] = field(default_factory=list)
    use_relay: bool = False
    public: bool = False

    def __post_init__(self) -> None:
        for flag, maddrs in (("--host-maddrs", self.host_maddrs), ("--announce-maddrs", self.announce_maddrs)):
            for maddr in maddrs:
                _check_maddr(flag, maddr)

    @property
    def loopback(self) -> bool:
        """No NAT traversal or relays, and 127.0.0.1 unless host_maddrs says otherwise (membership.LOOPBACK_KW)."""
        return not self.public

    @property
    def listen(self) -> list[str]:
        return self.host_maddrs or ([ALL_INTERFACES] if self.public else [])

    def dht_kwargs(self) -> dict[str, Any]:
        """Options for hivemind.DHT (they override the loopback defaults that `loopback` selects)."""
        kw: dict[str, Any] = {}
        if self.listen:
            kw["host_maddrs"] = self.listen
        if self.announce_maddrs:
            kw["announce_maddrs"] = self.announce_maddrs
        if self.use_relay:  # use relays, and look for one to be reachable through when behind a NAT
            kw.update(use_relay=True, use_auto_relay=True)
        return kw

    @property
    def tcp_host(self) -> str | None:
        """The direct TCP path's listen address: the first IPv4 one of host_maddrs (None: where p2p announces)."""
        return next(iter(_ip4s(self.listen)), None)

    @property
    def tcp_port(self) -> int:
        """The direct TCP path's port: the one after host_maddrs' first fixed TCP port (0: any free port)."""
        ports = [int(p[4]) for p in (m.split("/") for m in self.listen) if len(p) > 4 and p[3] == "tcp"]
        return next((port + 1 for port in ports if port), 0)

    @property
    def announce_hosts(self) -> list[str] | None:
        """The direct TCP path's announced addresses: the IPv4 ones of announce_maddrs, else of host_maddrs unless
        that is every interface (None: the transport asks p2p which addresses it announces)."""
        hosts = _ip4s(self.announce_maddrs) or [h for h in _ip4s(self.listen) if h != "0.0.0.0"]
        return hosts or None


def _ip4s(maddrs: list[str]) -> list[str]:
    parts = [m.split("/") for m in maddrs]  # "/ip4/1.2.3.4/tcp/5" -> ["", "ip4", "1.2.3.4", "tcp", "5"]
    return [p[2] for p in parts if len(p) > 2 and p[1] == "ip4"]


def _check_maddr(flag: str, maddr: str) -> None:
    from hivemind.utils.multiaddr import Multiaddr  # hivemind's own parser: what the DHT will accept

    try:
        Multiaddr(maddr)
    except Exception as exc:  # the parser raises several error types for bad input
        raise UserError(f"{flag} {maddr!r} is not a multiaddress ({exc}); e.g. /ip4/0.0.0.0/tcp/31337") from None
