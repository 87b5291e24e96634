"""`gwtf dashboard`: watch a live run in a browser: its pipeline, the flows of the current iteration with each link's
cost, the routing's gap to the optimum, loss and tokens/s with crashes, joins and rebuilds, microbatch accounting
and bytes on the wire per message kind.

    gwtf dashboard --initial-peers ADDR --run myrun [--port 8265] [--host 127.0.0.1] [--key run.key]

It joins the run's DHT as a client (it never serves a stage or data, and writes nothing), reads the node records
and the data nodes' telemetry every second, and serves a read-only page on 127.0.0.1 unless `--host` says otherwise.
A run by invitation needs its key (`--key FILE`) to be watched. `gwtf demo --dashboard` and the churn harness's
`--dashboard` start one through the process launcher (`start_dashboard`).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import logging
import re
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gwtf.errors import UserError

if TYPE_CHECKING:
    from gwtf.auth import RunAccess
    from gwtf.dashboard.model import RunWatch
    from gwtf.launch.processes import ProcessGroup
    from gwtf.membership import RunRecord

log = logging.getLogger(__name__)

DEFAULT_PORT = 8265
READY = "dashboard of run"  # the line (with the URL) it prints once it serves
URL_LINE = re.compile(READY + r" \S+: (http://\S+)")


def add_arguments(parser: argparse.ArgumentParser, command: str = "dashboard") -> None:
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="ADDR", help="a multiaddr of the run")
    parser.add_argument("--run", required=True, help="run name")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT}; 0: any free port)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    parser.add_argument("--key", default=None, metavar="FILE", help="the run key (a run by invitation needs it)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the run record")
    parser.add_argument("--public", action="store_true", help="reach the run's DHT over the network with NAT traversal")


def run(args: argparse.Namespace) -> int:
    check_address(args.host, args.port)
    return asyncio.run(_main(args))


def check_address(host: str, port: int, flag: str = "--port") -> None:
    if not 0 <= port <= 65535:
        raise UserError(f"{flag} {port}: a TCP port is 0..65535 (0: any free port)")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UserError(
            f"--host {host!r} is not an IP address; the default 127.0.0.1 serves this machine only"
        ) from None
    if not address.is_loopback:
        log.warning("serving on %s: anyone who reaches it can read the run's state (read-only)", host)


async def _main(args: argparse.Namespace) -> int:
    from gwtf.auth import join_access
    from gwtf.dashboard.server import Poller, make_app, serve
    from gwtf.membership import DHTMembership, make_dht

    access = join_access(args.run, args.key)  # a bad key file: one line, before anything starts
    check_free(args.host, args.port)  # a port in use: one line, before the wait for the run
    dht = make_dht(args.initial_peers, loopback=not args.public, access=access, client_mode=True)
    try:
        record = await asyncio.to_thread(find_watched_run, dht, args.initial_peers, access, args.timeout, args.public)
        poller = Poller(watch_of(record), DHTMembership(dht, args.run))
        try:
            runner, port = await serve(make_app(poller), args.host, args.port)
        except OSError as exc:
            raise UserError(bind_error(args.host, args.port, exc)) from None
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"{READY} {args.run}: http://{host}:{port}/  (read-only; Ctrl-C stops it)", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        polling = asyncio.ensure_future(poller.run())
        try:
            await stop.wait()
        finally:
            polling.cancel()
            await runner.cleanup()
        return 0
    finally:
        dht.shutdown()


def find_watched_run(
    dht: Any, initial_peers: list[str], access: RunAccess, timeout: float, public: bool = False
) -> RunRecord:
    """The run record; a run by invitation without its key, an unknown run or a wrong key: one line each."""
    from gwtf.membership import DHTMembership, find_run

    if access.keyed:
        return find_run(dht, initial_peers, access, timeout, loopback=not public)  # a wrong key: its own line
    record = DHTMembership(dht, access.run_id).get_run(timeout)
    if record is None:
        raise UserError(
            f"run {access.run_id!r} not found via {initial_peers[0]} within {timeout:g}s: check --run and "
            "--initial-peers (the address `gwtf bootstrap` printed, of a live peer)"
        )
    if record.key_id:
        raise UserError(
            f"run {access.run_id!r} is by invitation: watch it with --key FILE (the run key from whoever "
            "bootstrapped it)"
        )
    return record


def watch_of(record: RunRecord) -> RunWatch:
    """The dashboard's model of the run in `record`."""
    from gwtf.config import from_dict
    from gwtf.dashboard.model import RunWatch
    from gwtf.runtime.spec import run_spec

    if not isinstance(record.config.get("run"), dict):
        raise UserError(f"run {record.run_id!r} has a record without its settings; bootstrap it with this version")
    cfg = from_dict(record.config["run"])
    return RunWatch(record, run_spec(record.run_id, cfg, int(record.config.get("data_nodes", 1))))


def check_free(host: str, port: int, flag: str = "--port") -> None:
    """UserError if host:port cannot be bound now (in use, or not an address of this machine)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds it
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(bind_error(host, port, exc, flag)) from None


def bind_error(host: str, port: int, exc: OSError, flag: str = "--port") -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use: choose another with {flag} (0: any free port)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host}: not an address of this machine"
    if exc.errno == errno.EACCES:
        return f"port {port}: not allowed for this user (below 1024 needs privileges); choose another with {flag}"
    return f"cannot serve on {host}:{port}: {exc.strerror}"


# ---------------------------------------------------------------------------------------------------------------
# Started by a launcher (gwtf demo --dashboard, the churn harness)


def start_dashboard(group: ProcessGroup, initial_peers: list[str], run_id: str, port: int) -> None:
    """Start `gwtf dashboard` as child "dashboard" of the process group `group` (gwtf.launch.processes); it serves
    once it has read the run record (`dashboard_url`)."""
    group.start("dashboard", ["dashboard", "--initial-peers", *initial_peers, "--run", run_id, "--port", str(port)])


def dashboard_url(group: ProcessGroup, timeout: float = 120.0) -> str:
    """The URL the dashboard child of `group` serves on, once it does (bounded wait; a UserError naming its log if
    it exits first)."""
    group.wait_for_line(["dashboard"], READY, timeout)
    found = URL_LINE.search(group.log_text("dashboard"))
    if found is None:
        raise UserError(f"the dashboard printed no URL; see {Path(group.log_dir) / 'dashboard.log'}")
    return found.group(1)


def check_port_flag(port: int, flag: str = "--dashboard") -> None:
    """A launcher's `--dashboard PORT`, checked before anything starts (the dashboard serves on 127.0.0.1)."""
    check_address("127.0.0.1", port, flag)
    check_free("127.0.0.1", port, flag)
