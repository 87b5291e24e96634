"""`gwtf status`: the stages, replicas and data nodes of a live run, read from its DHT records, with why each one is
or is not routed through (gwtf.node_states).

gwtf status --initial-peers ADDR --run myrun [--key run.key] [--watch [SECONDS]]

With --watch it reads the records again every few seconds (each read bounded) and redraws in place until Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from gwtf.auth import join_access
from gwtf.errors import UserError
from gwtf.membership import DHT_TIMEOUT_S, DHTMembership, Membership, NodeRecord, RunRecord, make_dht
from gwtf.node_states import explain_all, run_version

WATCH_S = 3.0  # --watch without a value: seconds between refreshes
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen: a terminal redraws in place


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="ADDR", help="a multiaddr of the run")
    parser.add_argument("--run", required=True, help="run name")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the run record")
    parser.add_argument("--public", action="store_true", help="listen on all interfaces with NAT traversal")
    parser.add_argument("--key", default=None, metavar="FILE", help="the run key, to verify the records of a keyed run")
    parser.add_argument("--watch", nargs="?", type=float, const=WATCH_S, default=None, metavar="SECONDS",
                        help=f"refresh every SECONDS (default {WATCH_S:g}) until Ctrl-C")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from gwtf import lifecycle

    lifecycle.install()  # its DHT client's p2pd ends with it
    interval = check_watch(getattr(args, "watch", None))
    access = join_access(args.run, getattr(args, "key", None))
    dht = make_dht(args.initial_peers, loopback=not args.public, access=access, client_mode=True)
    try:
        membership = DHTMembership(dht, args.run)
        rec = membership.get_run(timeout=args.timeout)
        if rec is None:
            raise UserError(
                f"run {args.run!r} not found via {args.initial_peers} within {args.timeout:g}s; check the name"
            )
        if rec.key_id and not access.keyed:
            print(f"run {args.run} is by invitation: pass --key FILE to verify its records (unverified below)")
        if interval is None:
            print(snapshot(rec, membership))
        else:
            watch(lambda: snapshot(rec, membership), interval)
    finally:
        dht.shutdown()
    return 0


def check_watch(seconds: float | None) -> float | None:
    """--watch's interval, refused in one line before anything starts unless it is a positive number of seconds."""
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"--watch {seconds:g}: seconds between refreshes must be a positive number")
    return seconds


def snapshot(run: RunRecord, membership: Membership) -> str:
    """The status table from one read of the records (and the data nodes' telemetry, where published)."""
    nodes = membership.live_nodes()
    return format_status(run, nodes, _telemetry(membership))


def _telemetry(membership: Membership) -> Mapping[str, Any] | None:
    """What data nodes publish (gwtf.telemetry), where this version has it; the table goes on without it (a replica
    found gone is then not marked) if it cannot be read in time."""
    read = getattr(membership, "telemetry", None)
    if not callable(read):
        return None
    try:
        return read()
    except TimeoutError:
        return None


def watch(
    render: Callable[[], str], interval: float, out: TextIO = sys.stdout, sleep: Callable[[float], None] = time.sleep
) -> int:
    """Print `render()` every `interval` seconds until Ctrl-C, redrawn in place on a terminal; returns the frames
    shown. A read that times out (every DHT read is bounded) is said and retried at the next refresh."""
    frames = 0
    try:
        while True:
            began = time.monotonic()
            try:
                text = render()
            except TimeoutError:
                text = f"(no answer from the DHT within {DHT_TIMEOUT_S:g}s; trying again)"
            head = CLEAR if out.isatty() else ("\n" if frames else "")
            out.write(f"{head}{text}\n{time.strftime('%H:%M:%S')}  every {interval:g}s, Ctrl-C to stop\n")
            out.flush()
            frames += 1
            sleep(max(0.0, interval - (time.monotonic() - began)))
    except KeyboardInterrupt:
        out.write("\n")
    return frames


def format_status(run: RunRecord, nodes: dict[str, NodeRecord], telemetry: Mapping[str, Any] | None = None) -> str:
    """The table: per stage its replicas, then the data nodes; each row ends with why it is (not) routed through.
    `telemetry`: the data nodes' (Membership.telemetry), for the replicas they found gone."""
    n_stages = int(run.model.get("n_stages", 0))
    relays = [r for r in nodes.values() if r.role == "relay"]
    data = sorted((r for r in nodes.values() if r.role == "data"), key=lambda r: r.peer_id)
    why = explain_all(nodes, telemetry)
    step = run_version(nodes, telemetry)
    total = run.config.get("run", {}).get("train", {}).get("steps") if isinstance(run.config, dict) else None
    lines = [
        f"run {run.run_id}  model hash {run.model_hash}  stages {n_stages}  nodes {len(nodes)}  "
        f"step {'-' if step is None else step}{'' if total is None else f'/{total}'}{_progress(telemetry)}"
    ]
    header = (
        f"  {'peer':<14} {'status':<8} {'cap':>4} {'held':>4} {'mbatch/s':>9} {'state':>6} {'done':>6} "
        f"{'device':<6} {'region':<14} why"
    )
    for stage in sorted({*range(1, n_stages + 1), *(r.stage for r in relays)}):
        replicas = sorted((r for r in relays if r.stage == stage), key=lambda r: r.peer_id)
        total = sum(r.capacity for r in replicas if r.status == "serving")
        lines += [f"stage {stage}: {len(replicas)} replica(s), serving capacity {total}", header]
        lines += [_row(r, why[r.peer_id]) for r in replicas] or ["  (none)"]
    lines += [f"data nodes: {len(data)}", header, *(_row(r, why[r.peer_id]) for r in data)]
    return "\n".join([*lines, *_addresses(nodes)])


def _progress(telemetry: Mapping[str, Any] | None) -> str:
    """The loss and tokens/s of the newest step any data node published (gwtf.telemetry's history)."""
    last = [h[-1] for t in (telemetry or {}).values() if isinstance(t, Mapping)
            if isinstance(h := t.get("history"), list) and h and isinstance(h[-1], Mapping)]  # fmt: skip
    rows = [r for r in last if isinstance(r.get("loss"), float) and isinstance(r.get("iteration"), int)]
    if not rows:
        return ""
    newest = max(r["iteration"] for r in rows)
    at = [r for r in rows if r["iteration"] == newest]
    loss = sum(r["loss"] for r in at) / len(at)
    tokens = sum(float(r.get("tokens_per_s") or 0.0) for r in at)
    return f"  loss {loss:.4f} (step {newest})  {tokens:.0f} tok/s"


ADDRESSES_SHOWN = 3


def _addresses(nodes: dict[str, NodeRecord]) -> list[str]:
    """Addresses of serving nodes to hand to a new volunteer (--initial-peers): any live peer of the run will do,
    so the run does not depend on the bootstrap's."""
    found = [m for r in sorted(nodes.values(), key=lambda r: r.peer_id) if r.status == "serving" for m in r.maddrs[:1]]
    if not found:
        return []
    return ["join through any live node (--initial-peers):", *(f"  {m}" for m in found[:ADDRESSES_SHOWN])]


def _row(r: NodeRecord, why: str) -> str:
    peer = r.peer_id[-12:]
    return (
        f"  ..{peer:<12} {r.status:<8} {r.capacity:>4} {r.held:>4} {r.throughput:>9.2f} {r.state_version:>6} "
        f"{r.microbatches_done:>6} {r.device:<6} {r.region or '-':<14} {why}"
    )
