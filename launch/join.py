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
from gwtf.errors import BadMessage, PeerError, UserError
from gwtf.faults import Fault, FaultInjector
from gwtf.launch.network import add_address_arguments, addresses_of
from gwtf.membership import RunRecord, check_model_hash, dht_addresses, make_dht, serving
from gwtf.metrics import MetricsWriter
from gwtf.placement import place_volunteer
from gwtf.runtime.spec import NodeOptions, RunSpec, run_spec
from gwtf.tensorboard import ScalarBoard, check_logdir

if TYPE_CHECKING:
    from gwtf.runtime.datanode import DataNode
    from gwtf.runtime.flights import IterationReport

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, command: str = "join") -> None:
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddress(es) printed by bootstrap")
    parser.add_argument("--run", required=True, help="the run's name, as given to gwtf bootstrap")
    parser.add_argument("--role", choices=("relay", "data"), default="relay", help="serve a stage, or drive the steps")
    parser.add_argument("--stage", type=int, default=None, help="relay stage (default: where it adds most)")
    parser.add_argument("--rank", type=int, default=0, help="data node rank (its data shard)")
    parser.add_argument("--capacity", type=int, default=None,
                        help="microbatches a relay holds at once (default: what its device's memory holds, at most the "
                        "run's microbatches per step)")  # fmt: skip
    parser.add_argument("--device", default="auto",
                        help="auto | cpu | cuda | cuda:N: where it computes (auto: CUDA if present)")  # fmt: skip
    parser.add_argument(
        "--region",
        default=None,
        help="emulate this region's links (a region of gwtf/resources/regions.json; default: none)",
    )
    parser.add_argument("--metrics", default=None, help="JSON-lines metrics file (data nodes)")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="TensorBoard scalars into DIR (data nodes; then: tensorboard --logdir DIR)")  # fmt: skip
    add_address_arguments(parser)  # --public, --host-maddrs, --announce-maddrs, --use-relay
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
    from gwtf import lifecycle

    lifecycle.install()  # its p2pd ends with it, whatever ends it
    signal.signal(signal.SIGTERM, _interrupt)  # a clean stop (a serving relay handles SIGTERM itself)
    return asyncio.run(_main(args))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


async def _main(args: argparse.Namespace) -> int:
    from gwtf.auth import join_access
    from gwtf.membership import DHTMembership, check_invitation, find_run
    from gwtf.transport import HivemindTransport, LinkEmulator

    # checked before anything starts; the device is resolved (the first CUDA call) once the DHT is up
    opts = NodeOptions(capacity=args.capacity, region=args.region, device=args.device)
    addrs = addresses_of(args)  # a bad multiaddress too
    _check_tensorboard(args)
    access = join_access(args.run, args.key)
    # A stranger is refused here, by a DHT client that writes nothing, before this node becomes a DHT peer of the run.
    await asyncio.to_thread(
        check_invitation, args.initial_peers, access, args.join_timeout, loopback=addrs.loopback, **addrs.dht_kwargs()
    )
    dht = make_dht(args.initial_peers, loopback=addrs.loopback, access=access, **addrs.dht_kwargs())
    membership = DHTMembership(dht, args.run)
    try:
        record = await asyncio.to_thread(
            find_run, dht, args.initial_peers, access, args.join_timeout, loopback=not args.public
        )
        spec = _spec(args, record)
        p2p = await dht.replicate_p2p()
        emulator = LinkEmulator() if args.region else None
        transport = await HivemindTransport.create(
            p2p, args.run, region=args.region, emulator=emulator, access=access, tcp_host=addrs.tcp_host,
            tcp_port=addrs.tcp_port, announce_hosts=addrs.announce_hosts, encrypt=spec.config.wire.encrypt,
        )  # fmt: skip
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
    _check_local_copy(cfg.pretrained, record.config.get("weights_hash"), "checkpoint")
    _check_local_copy(cfg.resume, record.config.get("resume_hash"), "saved state")
    return run_spec(args.run, cfg, int(record.config.get("data_nodes", 1)))


def _check_local_copy(path: str | None, expected: str | None, kind: str) -> None:
    """This machine's copy of what the run starts from (`kind`: "checkpoint", a fine-tune's staged checkpoint; "saved
    state", a resumed run's, gwtf.resume) must be the run's: the hash the run record carries."""
    if not path or not Path(path).is_dir():
        return
    from gwtf.models.checkpoint import read_manifest
    from gwtf.resume import state_hash

    found = read_manifest(path).get("weights_hash") if kind == "checkpoint" else state_hash(path)
    if found != expected:
        raise UserError(
            f"{path} has hash {found} but the run's {kind} has {expected}: this is another {kind}; use the run's "
            "own copy (or remove it: the stage is then downloaded from a live replica)"
        )


PROBE_AT_MOST = 64  # relays a standby probes per poll; a larger swarm waits for dead records to expire instead


LOSS_CONFIRM_READS = 2  # reads in a row a replica's record must be missing from before it counts as lost


async def wait_for_a_loss(membership, n_stages: int, poll_s: float = 0.5, transport=None) -> int:
    """A standby volunteer waits, ready, until a replica that served is lost, and returns its stage. A replica is
    lost when a probe finds it gone (with a transport, in a small swarm: at once rather than when its DHT record
    expires), or when its record is missing from LOSS_CONFIRM_READS reads in a row. One read that missed a record
    (a DHT get that reached too few peers: seen on a loaded machine) is not a loss, nor is a read that failed."""
    from gwtf.liveness import gone

    seen: dict[str, int] = {}  # replicas seen serving -> stage
    missing: dict[str, int] = {}  # replicas missing from the last reads -> reads in a row
    while True:
        try:
            nodes = await asyncio.to_thread(membership.live_nodes)
        except Exception as exc:  # noqa: BLE001 (a DHT read that timed out: the next poll reads again)
            log.info("standby: reading the records failed (%s); reading again", exc)
            await asyncio.sleep(poll_s)
            continue
        relays = {p: r.stage for p, r in serving(nodes, "relay").items() if 1 <= r.stage <= n_stages}
        seen.update(relays)
        dead: set[str] = set()
        if transport is not None and 0 < len(seen) <= PROBE_AT_MOST:
            dead = await gone(transport, set(seen), timeout=max(poll_s, 1.0))
        for peer in set(seen) - set(relays):
            missing[peer] = missing.get(peer, 0) + 1
        for peer in set(relays):
            missing.pop(peer, None)
        lost = dead | {p for p, n in missing.items() if n >= LOSS_CONFIRM_READS}
        if lost:
            counts = {k: sum(1 for p, s in relays.items() if s == k and p not in lost) for k in range(1, n_stages + 1)}
            stage = min({seen[p] for p in lost}, key=lambda k: (counts[k], k))
            log.info("standby: replica(s) %s lost (probe: %s)", sorted(p[:8] for p in lost), sorted(dead))
            return stage
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
    from gwtf import liveness
    from gwtf.recovery import RecoveryError
    from gwtf.runtime.assembly import module_builder
    from gwtf.runtime.relay import RelayNode

    if args.standby:
        lost = asyncio.ensure_future(wait_for_a_loss(membership, spec.model.n_stages, transport=transport))
        over = asyncio.ensure_future(until_run_over(membership.live_nodes, spec.total_steps))
        await asyncio.wait([lost, over], return_when=asyncio.FIRST_COMPLETED)
        (lost if over.done() else over).cancel()
        if over.done():
            print("standby volunteer: the run reached its last step without losing a replica; exiting", flush=True)
            return 0
        stage = lost.result()
        print(f"standby volunteer: a replica of stage {stage} was lost; taking over", flush=True)
    else:
        stage = args.stage or await place_volunteer(  # announced before it loads: volunteers arriving together spread
            membership,
            transport.peer_id,
            spec.model.n_stages,
            lambda: answering_nodes(transport, membership),
            gone=lambda peers: liveness.gone(transport, peers),
        )
    node = RelayNode(spec, transport, membership, opts, stage)
    node.maddrs = dht_addresses(membership.dht)  # in its record: `gwtf status` hands them out to volunteers
    if args.fault:
        node.faults = FaultInjector([Fault.parse(args.fault)])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await node.start(module_builder(spec), timeout=args.join_timeout)
    except (PeerError, BadMessage, RecoveryError) as exc:
        # The run may have ended while this node joined (its donors and neighbours exited at the last step): that is
        # not an error of this volunteer's; anything else is.
        if not await _run_is_over(membership, spec.total_steps):
            if isinstance(exc, RecoveryError):  # every relay stage is gone: nothing left to rebuild this one from
                await node.close()
                raise UserError(f"stage {stage} lost every replica and cannot be rebuilt: {exc}") from None
            raise
        await node.close()
        print(f"relay {transport.peer_id}: the run reached its last step ({spec.total_steps}) while this node was "
              f"joining ({exc}); exiting", flush=True)  # fmt: skip
        return 0
    print(f"relay {transport.peer_id} serving stage {stage}", flush=True)
    print(f"volunteers may join through this node: --initial-peers {' '.join(node.maddrs[:1])}", flush=True)
    waits = [asyncio.ensure_future(until_run_over(membership.live_nodes, spec.total_steps, me=transport.peer_id)),
             asyncio.ensure_future(stop.wait())]  # fmt: skip
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    await node.close()
    if not stop.is_set():
        print(f"relay {transport.peer_id}: the run reached its last step ({spec.total_steps}); exiting", flush=True)
    return 0


async def _run_is_over(membership, total_steps: int) -> bool:
    """One bounded read of the records: has the run reached its last step (gwtf.membership.RunEnd)?"""
    from gwtf.membership import RunEnd

    try:
        # one read, no grace: asked after a join failed, whose donors and neighbours may have left at the run's end
        return RunEnd(total_steps, grace=0.0).over(await asyncio.to_thread(membership.live_nodes))
    except Exception as exc:  # noqa: BLE001 (the DHT did not answer: not known to be over)
        log.info("reading the records for the run's end failed (%s)", exc)
        return False


RUN_END_POLL_S = 2.0  # how often a relay, a standby or the bootstrap reads the records to see whether the run is over


async def until_run_over(live_nodes, total_steps: int, poll_s: float = RUN_END_POLL_S, me: str | None = None) -> None:
    """Return once the run is over (gwtf.membership.RunEnd): a node reached the last step and no data node serves.
    `live_nodes`: a blocking read of the records; one that fails (bounded) is tried again at the next poll; `me`: the
    reader's peer id (its own record keeps nothing up)."""
    from gwtf.membership import RunEnd

    end = RunEnd(total_steps, me=me)
    while True:
        await asyncio.sleep(poll_s)
        try:
            if end.over(await asyncio.to_thread(live_nodes)):
                return
        except Exception as exc:  # noqa: BLE001 (a DHT read that timed out: the next poll reads again)
            log.debug("reading the records for the run's end failed (%s)", exc)


async def _drive_data(args, spec, opts, transport, membership) -> int:
    from gwtf.data import load_data
    from gwtf.runtime.assembly import make_data_node

    data = load_data(spec.config.data, spec.model.seq_len)
    node = make_data_node(spec, transport, membership, opts, args.rank, data)
    node.maddrs = dht_addresses(membership.dht)
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
            print(step_line(row, spec.total_steps), flush=True)
            board.iteration(row)
            if board.enabled:  # computed in the board's worker thread: the next iteration starts at once
                board.in_background(report.iteration, routing_gap_of(node), prefix="routing/")
        await node.hand_on_last_copy()  # before "done": an export then reads edge relays that stream nothing
        metrics.write(event="done", seconds=time.perf_counter() - t0)
        print(f"data node {transport.peer_id}: the run reached its last step ({spec.total_steps}) in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
        if args.linger:  # keep serving stage 0 (for `gwtf export --run`) until stopped
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
    finally:
        metrics.close()
        board.close()
        await node.close()
    return 0


BAR_WIDTH = 20


def step_line(row: dict[str, Any], total_steps: int) -> str:
    """What a data node prints per step (its terminal is a volunteer's view of the run):
    `[#####...............]  10/40  loss 4.1234   5210 tok/s  live per stage [2, 2, 2]  re-routed 0  lost 0`."""
    done = row["iteration"] + 1
    filled = BAR_WIDTH * done // max(total_steps, 1)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    width = len(str(total_steps))
    return (
        f"[{bar}] {done:>{width}}/{total_steps}  loss {row['loss']:.4f}  {row['tokens_per_s']:7.0f} tok/s  "
        f"live per stage {row['live_per_stage']}  re-routed {row['rerouted']}  lost {row['lost']}"
    )


def iteration_row(report: IterationReport, live_per_stage: list[int]) -> dict[str, Any]:
    """A data node's iteration as its metrics line and TensorBoard scalars have it."""
    tokens_per_s = report.tokens / max(report.seconds, 1e-9)
    counts = {
        k: getattr(report, k) for k in ("started", "finished", "rerouted", "partial", "lost", "waves", "resynced")
    }
    head = {"iteration": report.iteration, "loss": report.loss, "tokens_per_s": tokens_per_s, "seconds": report.seconds}
    # {stage: [replicas hashed, distinct hashes]}; one distinct hash: the stage's replicas are identical
    hashes = {str(stage): list(counts) for stage, counts in report.weight_hashes.items()}
    return {**head, **counts, "live_per_stage": live_per_stage, "weight_hashes": hashes}


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
