"""`gwtf join`: a volunteer joins a run as a relay (serves one stage) or as a data node (drives iterations).

    gwtf join --initial-peers ADDR --run myrun                       # relay; picks the stage that needs it
    gwtf join --initial-peers ADDR --run myrun --role data --rank 0 --metrics data0.jsonl [--tensorboard DIR]

The node reads the run record, refuses a run whose model hash differs from the config it builds, then serves
until it is stopped (a relay) or until the run's steps are done (a data node).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gwtf.config import from_dict
from gwtf.errors import UserError
from gwtf.faults import Fault, FaultInjector
from gwtf.membership import RunRecord, check_model_hash, make_dht, serving
from gwtf.metrics import MetricsWriter
from gwtf.placement import choose_stage
from gwtf.runtime.spec import NodeOptions, RunSpec, run_spec
from gwtf.tensorboard import ScalarBoard, check_logdir

if TYPE_CHECKING:
    from gwtf.runtime.datanode import DataNode
    from gwtf.runtime.flights import IterationReport

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, command: str = "join") -> None:
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddress(es) printed by bootstrap")
    parser.add_argument("--run", required=True)
    parser.add_argument("--role", choices=("relay", "data"), default="relay")
    parser.add_argument("--stage", type=int, default=None, help="relay stage (default: where it adds most)")
    parser.add_argument("--rank", type=int, default=0, help="data node rank (its data shard)")
    parser.add_argument("--capacity", type=int, default=4, help="microbatches a relay holds at once (default: 4)")
    parser.add_argument("--device", default="cpu", help="cpu (stage compute on CUDA is not in this version)")
    parser.add_argument("--region", default=None, help="emulate this region's links (shared/data/regions.json)")
    parser.add_argument("--metrics", default=None, help="JSON-lines metrics file (data nodes)")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="TensorBoard scalars into DIR (data nodes; then: tensorboard --logdir DIR)")  # fmt: skip
    parser.add_argument("--public", action="store_true", help="listen on all interfaces with NAT traversal")
    parser.add_argument("--join-timeout", type=float, default=300.0, help="reaching the run, downloading the state")
    parser.add_argument("--key", default=None, metavar="FILE", help="the run key (a run by invitation needs it)")
    parser.add_argument("--linger", action="store_true", help="a data node keeps serving after the last step")
    parser.add_argument(
        "--standby", action="store_true", help="a relay waits until a replica is lost, then replaces it"
    )
    parser.add_argument(
        "--fault",
        default=None,
        metavar="PHASE@ITERATION",
        help="fault injection: this process SIGKILLs itself there (e.g. backward@10)",
    )


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    if args.device != "cpu":
        raise UserError(f"--device {args.device}: this version computes stages on the CPU only; join with --device cpu")
    from gwtf.auth import join_access
    from gwtf.membership import DHTMembership, find_run
    from gwtf.transport import HivemindTransport, LinkEmulator

    opts = NodeOptions(capacity=args.capacity, region=args.region)  # checked before anything starts
    _check_tensorboard(args)
    access = join_access(args.run, args.key)
    dht = make_dht(args.initial_peers, loopback=not args.public, access=access)
    membership = DHTMembership(dht, args.run)
    try:
        record = await asyncio.to_thread(
            find_run, dht, args.initial_peers, access, args.join_timeout, loopback=not args.public
        )
        spec = _spec(args, record)
        p2p = await dht.replicate_p2p()
        emulator = LinkEmulator() if args.region else None
        transport = await HivemindTransport.create(p2p, args.run, region=args.region, emulator=emulator, access=access)
        if args.role == "relay":
            return await _serve_relay(args, spec, opts, transport, membership)
        return await _drive_data(args, spec, opts, transport, membership)
    finally:
        dht.shutdown()


def _check_tensorboard(args: argparse.Namespace) -> None:
    if args.tensorboard is None:
        return
    if args.role != "data":
        raise UserError(f"--tensorboard {args.tensorboard}: only data nodes write scalars; join with --role data")
    check_logdir(args.tensorboard)


def _spec(args: argparse.Namespace, record: RunRecord) -> RunSpec:
    cfg = from_dict(record.config["run"])
    check_model_hash(record, cfg.model_config().config_hash())
    _check_pretrained_copy(cfg.pretrained, record.config.get("weights_hash"))
    return run_spec(args.run, cfg, int(record.config.get("data_nodes", 1)))


def _check_pretrained_copy(path: str | None, expected: str | None) -> None:
    """This machine's copy of the run's checkpoint must be the run's: same weights hash."""
    if not path or not Path(path).is_dir():
        return
    from gwtf.models.checkpoint import read_manifest

    found = read_manifest(path).get("weights_hash")
    if found != expected:
        raise UserError(
            f"{path} has weights hash {found} but the run fine-tunes {expected}: this is another checkpoint; "
            "use the run's own copy (or remove it: the stage is then downloaded from a live replica)"
        )


PROBE_AT_MOST = 64  # relays a standby probes per poll; a larger swarm waits for dead records to expire instead


async def wait_for_a_loss(membership, n_stages: int, poll_s: float = 0.5, transport=None) -> int:
    """A standby volunteer waits, ready, until a stage has fewer serving replicas than it has had (a replica was
    lost: counts only grow while a swarm starts), and returns that stage. With a transport it also probes the
    serving relays (a small swarm's), so a crash counts at once rather than when its DHT record expires."""
    from gwtf.liveness import gone

    most = dict.fromkeys(range(1, n_stages + 1), 0)
    while True:
        nodes = await asyncio.to_thread(membership.live_nodes)
        relays = serving(nodes, "relay")
        if transport is not None and 0 < len(relays) <= PROBE_AT_MOST:
            dead = await gone(transport, set(relays), timeout=max(poll_s, 1.0))
            nodes = {p: r for p, r in nodes.items() if p not in dead}
        counts = {k: len(serving(nodes, "relay", k)) for k in most}
        lost = [k for k in most if counts[k] < most[k]]
        if lost:
            return min(lost, key=lambda k: (counts[k], k))
        most = {k: max(most[k], counts[k]) for k in most}
        await asyncio.sleep(poll_s)


async def answering_nodes(transport, membership) -> dict:
    """The relay records whose owner answers now. A crashed relay's record lives on in the DHT until it expires;
    a joiner that counted it would leave a stage that lost every replica empty (nobody would rebuild it)."""
    from gwtf.liveness import answering

    nodes = await asyncio.to_thread(membership.live_nodes)
    relays = {p for p, r in nodes.items() if r.role == "relay" and p != transport.peer_id}
    dead = relays - await answering(transport, relays)
    if dead:
        log.info("not counting %d relay record(s) whose owner does not answer: %s", len(dead), sorted(dead))
    return {p: r for p, r in nodes.items() if p not in dead}


async def _serve_relay(args, spec, opts, transport, membership) -> int:
    from gwtf.runtime.assembly import module_builder
    from gwtf.runtime.relay import RelayNode

    if args.standby:
        stage = await wait_for_a_loss(membership, spec.model.n_stages, transport=transport)
        print(f"standby volunteer: a replica of stage {stage} was lost; taking over", flush=True)
    else:
        stage = args.stage or choose_stage(await answering_nodes(transport, membership), spec.model.n_stages)
    node = RelayNode(spec, transport, membership, opts, stage)
    if args.fault:
        node.faults = FaultInjector([Fault.parse(args.fault)])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await node.start(module_builder(spec), timeout=args.join_timeout)
    print(f"relay {transport.peer_id} serving stage {stage}", flush=True)
    await stop.wait()
    await node.close()
    return 0


async def _drive_data(args, spec, opts, transport, membership) -> int:
    from gwtf.data import load_data
    from gwtf.runtime.assembly import make_data_node

    data = load_data(spec.config.data, spec.model.seq_len)
    node = make_data_node(spec, transport, membership, opts, args.rank, data)
    await node.start(expected_data_nodes=spec.data_nodes, timeout=args.join_timeout)
    metrics, board = MetricsWriter(args.metrics), ScalarBoard(args.tensorboard)
    t0 = time.perf_counter()
    try:
        while node.iteration < spec.total_steps:
            report = await node.run_iteration()
            live = await node.live_nodes()
            per_stage = [len(serving(live, "relay", k)) for k in range(1, spec.model.n_stages + 1)]
            row = iteration_row(report, per_stage)
            metrics.write(event="iteration", **row)
            board.iteration(row)
            if board.enabled:  # computed in the board's worker thread: the next iteration starts at once
                board.in_background(report.iteration, routing_gap_of(node), prefix="routing/")
        metrics.write(event="done", seconds=time.perf_counter() - t0)
        if args.linger:  # keep serving stage 0 (for `gwtf export --run`) until stopped
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
    finally:
        metrics.close()
        board.close()
        await node.close()
    return 0


def iteration_row(report: IterationReport, live_per_stage: list[int]) -> dict[str, Any]:
    """A data node's iteration as its metrics line and TensorBoard scalars have it."""
    tokens_per_s = report.tokens / max(report.seconds, 1e-9)
    counts = {k: getattr(report, k) for k in ("started", "finished", "rerouted", "partial", "lost", "waves")}
    head = {"iteration": report.iteration, "loss": report.loss, "tokens_per_s": tokens_per_s, "seconds": report.seconds}
    return {**head, **counts, "live_per_stage": live_per_stage}


def routing_gap_of(node: DataNode) -> Callable[[], dict[str, float]]:
    """The routing's gap to the optimum (gwtf.telemetry.routing_gap) for the iteration's first wave as `node`
    planned it: its paths and its demand, on the view it planned on. Its own demand only: under gwtf-p2p the other
    data nodes' paths are theirs, so with several data nodes the optimum here ignores what they take (a bound).
    The inputs are taken now; the call computes (in a worker thread)."""
    from gwtf.telemetry import plan_paths, routing_gap

    view, me = node.plan_view, node.peer_id
    plan, demand = {me: plan_paths(node.telemetry.plan)}, {me: node.telemetry.demand}

    def compute() -> dict[str, float]:
        if view is None:
            raise ValueError("the data node has planned no iteration yet")
        return routing_gap(view, plan, demand)

    return compute
