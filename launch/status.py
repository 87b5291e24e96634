"""`gwtf status`: the stages, replicas and data nodes of a live run, read from its DHT records.

gwtf status --initial-peers ADDR --run myrun [--key run.key]
"""

from __future__ import annotations

import argparse

from gwtf.auth import join_access
from gwtf.errors import UserError
from gwtf.membership import DHTMembership, NodeRecord, RunRecord, make_dht


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="ADDR", help="a multiaddr of the run")
    parser.add_argument("--run", required=True, help="run name")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the run record")
    parser.add_argument("--public", action="store_true", help="listen on all interfaces with NAT traversal")
    parser.add_argument("--key", default=None, metavar="FILE", help="the run key, to verify the records of a keyed run")


def run(args: argparse.Namespace) -> int:
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
        print(format_status(rec, membership.live_nodes()))
    finally:
        dht.shutdown()
    return 0


def format_status(run: RunRecord, nodes: dict[str, NodeRecord]) -> str:
    n_stages = int(run.model.get("n_stages", 0))
    relays = [r for r in nodes.values() if r.role == "relay"]
    data = sorted((r for r in nodes.values() if r.role == "data"), key=lambda r: r.peer_id)
    lines = [f"run {run.run_id}  model hash {run.model_hash}  stages {n_stages}  nodes {len(nodes)}"]
    header = f"  {'peer':<14} {'status':<8} {'cap':>4} {'mbatch/s':>9} {'state':>6} {'done':>6} region"
    for stage in sorted({*range(1, n_stages + 1), *(r.stage for r in relays)}):
        replicas = sorted((r for r in relays if r.stage == stage), key=lambda r: r.peer_id)
        total = sum(r.capacity for r in replicas if r.status == "serving")
        lines += [f"stage {stage}: {len(replicas)} replica(s), serving capacity {total}", header]
        lines += [_row(r) for r in replicas] or ["  (none)"]
    lines += [f"data nodes: {len(data)}", header, *(_row(r) for r in data)]
    return "\n".join(lines)


def _row(r: NodeRecord) -> str:
    peer = r.peer_id[-12:]
    return (
        f"  ..{peer:<12} {r.status:<8} {r.capacity:>4} {r.throughput:>9.2f} {r.state_version:>6} "
        f"{r.microbatches_done:>6} {r.region or '-'}"
    )
