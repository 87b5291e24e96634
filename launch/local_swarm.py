"""A whole swarm of processes on 127.0.0.1: bootstrap, relays, data nodes; a crash injected and recovered.

    gwtf demo                                   # the README's main job: debug model, embedded corpus
    gwtf demo --dashboard                       # the same, watched live at the URL it prints
    python -m gwtf.launch.local_swarm --stages 3 --replicas 2 --steps 40 --crash-at 15 --out runs/demo

Every node is a real process on hivemind (DHT + P2P on loopback). At `--crash-at`, one relay SIGKILLs itself in
the middle of an iteration (during `--crash-phase`, by the fault injector); its stage goes on with the surviving
replica, and a new volunteer joins (choosing the stage that lacks capacity and downloading its state from the live
replica). Every process starts through the process launcher (gwtf.launch.processes) and is ended by its pid when the
run ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gwtf.errors import UserError
from gwtf.launch.dashboard import DEFAULT_PORT, check_port_flag, dashboard_url, start_dashboard
from gwtf.launch.processes import ProcessGroup, read_jsonl  # ProcessGroup: tests/test_auth.py imports it from here

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, command: str = "demo") -> None:
    parser.add_argument("--preset", default="debug", help="model preset (gwtf.models.presets)")
    parser.add_argument("--stages", type=int, default=3, help="relay stages")
    parser.add_argument("--replicas", type=int, default=2, help="replicas per relay stage at the start")
    parser.add_argument("--data-nodes", type=int, default=1, help="data nodes that drive the run")
    parser.add_argument("--steps", type=int, default=40, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (weights, data order)")
    parser.add_argument("--crash-at", type=int, default=10, help="step at which a relay is SIGKILLed (-1: never)")
    parser.add_argument("--capacity", type=int, default=2,
                        help="microbatches a relay holds at once (2: every replica carries part of each step, so "
                        "the one set to crash is in use when its step comes)")  # fmt: skip
    parser.add_argument("--crash-stage", type=int, default=2, help="stage of the relay that crashes")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N for every local node")
    parser.add_argument("--crash-phase", default="backward", help="phase of the crash (gwtf.faults.PHASES)")
    parser.add_argument("--router", default="gwtf-p2p", help="gwtf-p2p | gwtf | swarm | round-robin | oracle")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config override")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="logs, metrics, summary.json (default: a new runs/demo-DATE-TIME each run)")  # fmt: skip
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="TensorBoard scalars, data node R's in DIR/data-R (tensorboard --logdir DIR)")  # fmt: skip
    parser.add_argument("--dashboard", type=int, nargs="?", const=DEFAULT_PORT, default=None, metavar="PORT",
                        help=f"serve the live dashboard on 127.0.0.1:PORT (default {DEFAULT_PORT}; 0: any free port) "
                        "and print its URL")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600.0, help="the whole run, seconds")
    parser.add_argument("--plain-processes", action="store_true",
                        help="start each node as its own Python process (default: fork the nodes from one process "
                        "that has imported torch, transformers and hivemind once; they start faster and share that "
                        "memory; gwtf/launch/zygote.py)")  # fmt: skip


def run(args: argparse.Namespace, extra: SwarmExtras | None = None) -> int:
    extra = extra or SwarmExtras()
    check_args(args, pretrained="--from-pretrained" in extra.bootstrap)  # one line, before any process starts
    out = _out_dir(args.out)
    group = ProcessGroup(out, preload=not getattr(args, "plain_processes", False))
    try:
        summary = _run_swarm(args, group, out, extra)
        if extra.after_done is None:  # no node lingers for later work: each ends by itself at the run's end
            summary["exits"] = _await_exits(group, timeout=EXIT_WAIT_S)
            # A node that failed after the run's end (a standby's traceback) fails the run: it would be a silent
            # error under a run that says it succeeded.
            summary["ok"] = summary["ok"] and not _bad_exits(summary["exits"])
    finally:
        group.stop_all()
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {out / 'summary.json'}; node logs in {out}/")
    print(outcome(args, summary), flush=True)
    return 0 if summary["ok"] else 1


IDLE_VICTIM_STEPS = 3  # steps after --crash-at the replica set to crash may stay unrouted before the demo kills it
EXIT_WAIT_S = 30.0  # at the run's end, how long the nodes have to exit by themselves before they are stopped


def _out_dir(given: str | None) -> Path:
    """`--out` as given (its old files removed), or a new directory per run: runs/demo-DATE-TIME[-N]."""
    if given is not None:
        out = Path(given)
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("*"):
            if stale.is_file():
                stale.unlink()
        return out
    base = Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    for n in range(1000):
        out = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            out.mkdir(parents=True)
            return out
        except FileExistsError:
            continue
    raise UserError(f"{base}: 1000 demo directories of this second exist; pass --out DIR")


def _await_exits(group: ProcessGroup, timeout: float) -> dict[str, int | None]:
    """Each node's exit code once every one has exited by itself (a node exits 0 when the run reached its last step
    and no data node serves), or after `timeout` seconds (None for those still running, then stopped)."""
    nodes = {name: p for name, p in group.procs.items() if name != "dashboard"}  # a watcher serves until stopped
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in nodes.values()):
        time.sleep(0.2)
    return {name: p.poll() for name, p in nodes.items()}


def _bad_exits(exits: dict[str, int | None]) -> list[str]:
    """The nodes that exited with an error: not 0, not SIGKILL (-9: the crash asked for), not still running."""
    return sorted(n for n, code in exits.items() if code not in (None, 0, -9))


def check_args(args: argparse.Namespace, pretrained: bool = False) -> None:
    """UserError, naming the value, for anything the swarm would otherwise start with and then fail on (or hang:
    a stage without replicas never serves). The run's own settings are checked as bootstrap will check them."""
    from gwtf.config import load_config
    from gwtf.faults import PHASES
    from gwtf.launch.bootstrap import LAUNCH_DEFAULTS
    from gwtf.runtime.spec import NodeOptions

    for name in ("stages", "replicas", "data_nodes", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if getattr(args, "capacity", None) is not None:
        NodeOptions(capacity=args.capacity)
    run_flags = [f"train.steps={args.steps}", f"train.seed={args.seed}", f"routing.router={args.router}", *args.set]
    if not pretrained:  # a pretrained checkpoint fixes the model; bootstrap checks it as it converts it
        run_flags += [f"preset={args.preset}", f"stages={args.stages}"]
    load_config(None, run_flags, defaults=LAUNCH_DEFAULTS)
    if getattr(args, "device", None) is not None:
        NodeOptions(device=args.device)  # the flag's form; CUDA itself is checked by each node as it starts
    if args.crash_at >= 0:
        if not 1 <= args.crash_stage <= args.stages:
            raise UserError(f"--crash-stage {args.crash_stage}: the swarm has stages 1..{args.stages}")
        if args.crash_phase not in PHASES:
            raise UserError(f"--crash-phase {args.crash_phase!r} is unknown; phases: {', '.join(PHASES)}")
        if args.crash_at >= args.steps:
            raise UserError(f"--crash-at {args.crash_at}: the run has steps 0..{args.steps - 1} (-1: no crash)")
    if getattr(args, "dashboard", None) is not None:
        check_port_flag(args.dashboard)
    if getattr(args, "tensorboard", None) is not None:
        from gwtf.tensorboard import check_logdir

        check_logdir(args.tensorboard)


@dataclass
class SwarmExtras:
    """What a launcher built on this one adds: bootstrap and data-node flags, and work to do once the data nodes
    are done while every node still serves (`after_done(initial_peers, run_id) -> summary fields`)."""

    bootstrap: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    after_done: Callable[[list[str], str], dict] | None = None
    run_prefix: str = "demo"


def _run_swarm(args: argparse.Namespace, group: ProcessGroup, out: Path, extra: SwarmExtras) -> dict:
    run_id = f"{extra.run_prefix}-{os.getpid()}"
    addr_file = out / "initial_peers.txt"
    overrides = [f"train.steps={args.steps}", f"train.seed={args.seed}", *args.set]
    group.start(
        "bootstrap",
        [
            "bootstrap",
            "--run",
            run_id,
            "--preset",
            args.preset,
            "--stages",
            str(args.stages),
            "--data-nodes",
            str(args.data_nodes),
            "--router",
            args.router,
            "--addr-file",
            str(addr_file),
            *sum((["--set", o] for o in overrides), []),
            *extra.bootstrap,
        ],
    )
    peers = group.wait_for_address(addr_file, timeout=60)
    dashboard = getattr(args, "dashboard", None)
    if dashboard is not None:  # it starts while the relays do, and sees every one join
        start_dashboard(group, peers, run_id, dashboard)
    join = ["join", "--run", run_id, "--initial-peers", *peers]
    if getattr(args, "capacity", None):
        join += ["--capacity", str(args.capacity)]
    join += ["--device", getattr(args, "device", "cpu")]
    for stage in range(1, args.stages + 1):
        for r in range(args.replicas):
            argv = [*join, "--role", "relay", "--stage", str(stage)]
            if args.crash_at >= 0 and (stage, r) == (args.crash_stage, 0):  # SIGKILLs itself at that point
                argv += ["--fault", f"{args.crash_phase}@{args.crash_at}"]
            group.start(f"relay-s{stage}-{r}", argv)
    if args.crash_at >= 0:  # a volunteer ready to replace the replica that will crash
        group.start("joiner-0", [*join, "--role", "relay", "--standby"])
    _wait_for_relays(group, [f"relay-s{k}-{r}" for k in range(1, args.stages + 1) for r in range(args.replicas)])
    if dashboard is not None:
        print(f"dashboard: {dashboard_url(group)}  (open it in a browser; it stops with the swarm)", flush=True)
    metrics = [out / f"data-{rank}.jsonl" for rank in range(args.data_nodes)]
    for rank, path in enumerate(metrics):
        argv = [*join, "--role", "data", "--rank", str(rank), "--metrics", str(path), *extra.data]
        if getattr(args, "tensorboard", None) is not None:  # one TensorBoard run per data node
            argv += ["--tensorboard", str(Path(args.tensorboard) / f"data-{rank}")]
        group.start(f"data-{rank}", argv)
    print(
        f"swarm {run_id}: {args.stages} stages x {args.replicas} replicas, {args.data_nodes} data node(s), "
        f"{args.steps} steps; initial peers {peers[0]}"
    )
    summary = _monitor(args, group, metrics)
    if extra.after_done is not None and summary["ok"]:
        summary.update(extra.after_done(peers, run_id))
    return summary


def _monitor(args: argparse.Namespace, group: ProcessGroup, metrics: list[Path]) -> dict:
    deadline = time.monotonic() + args.timeout
    crashed: dict = {}
    shown = 0
    while time.monotonic() < deadline:
        rows = [r for r in read_jsonl(metrics[0]) if r.get("event") == "iteration"]
        for row in rows[shown:]:
            print(
                f"step {row['iteration']:4d}  loss {row['loss']:.4f}  {row['tokens_per_s']:8.0f} tok/s  "
                f"live per stage {row['live_per_stage']}  rerouted {row['rerouted']}  lost {row['lost']}",
                flush=True,
            )
        shown = len(rows)
        victim = group.procs.get(f"relay-s{args.crash_stage}-0")
        if args.crash_at >= 0 and not crashed and victim is not None and victim.poll() is None \
                and shown >= args.crash_at + IDLE_VICTIM_STEPS:  # fmt: skip
            # The router left the replica set to crash idle since its step (it crashes at its first forward or
            # backward from there on): on a fast or loaded run the routing may not have taken it in yet, and the
            # crash under test would never come. The demo kills it itself, and says so.
            print(f"** relay-s{args.crash_stage}-0 was not routed through from step {args.crash_at} to {shown - 1}; "
                  "the demo SIGKILLs it now", flush=True)  # fmt: skip
            group.kill(f"relay-s{args.crash_stage}-0")
            crashed = _rejoin(args, group, shown, by_demo=True)
        if args.crash_at >= 0 and not crashed and victim is not None and victim.poll() is not None:
            crashed = _rejoin(args, group, shown)
        if crashed and not crashed.get("served_at_step") and _joiner_served(group):
            crashed["served_at_step"] = shown
            print(f"** the volunteer serves (downloaded the stage's state from the live replica) at step {shown}")
        done = [p for p in metrics if any(r.get("event") == "done" for r in read_jsonl(p))]
        if len(done) == len(metrics):
            break
        if group.failed():
            log.error("processes failed: %s", group.failed())
            break
        time.sleep(0.2)
    if crashed and not crashed.get("served_at_step"):
        _await_takeover(group, crashed, shown, timeout=60.0)
    return _summarize(args, group, metrics, crashed)


def _await_takeover(group: ProcessGroup, crashed: dict, step: int, timeout: float) -> None:
    """The data nodes may finish before the standby volunteer has downloaded its stage (fast iterations); the relays
    still serve, so wait, bounded, for the takeover to complete before everything is stopped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not _joiner_served(group):
        time.sleep(0.2)
    if _joiner_served(group):
        crashed["served_at_step"] = step
        print(f"** the volunteer serves (downloaded the stage's state from the live replica) after step {step}")


def _wait_for_relays(group: ProcessGroup, names: list[str], timeout: float = 180.0) -> None:
    """Training starts once the starting swarm serves: on a busy machine some processes start seconds after others,
    and a fast run would otherwise be over before them (the crash under test would never come)."""
    group.wait_for_line(names, "serving stage", timeout)


def _joiner_served(group: ProcessGroup) -> bool:
    return "serving stage" in group.log_text("joiner-0")


def _rejoin(args: argparse.Namespace, group: ProcessGroup, step: int, by_demo: bool = False) -> dict:
    victim = f"relay-s{args.crash_stage}-0"
    how = (f"was SIGKILLed by the demo at step {step} (exit {group.procs[victim].returncode})" if by_demo else
           f"SIGKILLed itself during the {args.crash_phase} of step {args.crash_at} "
           f"(exit {group.procs[victim].returncode})")  # fmt: skip
    print(f"** crash: {victim} (stage {args.crash_stage}) {how}", flush=True)
    print("** a volunteer on standby (no --stage) takes over the stage that lost a replica", flush=True)
    return {
        "victim": victim,
        "stage": args.crash_stage,
        "step": step if by_demo else args.crash_at,
        "phase": "killed by the demo (the router left it idle)" if by_demo else args.crash_phase,
        "wall_time": time.time(),
    }


def _summarize(args: argparse.Namespace, group: ProcessGroup, metrics: list[Path], crashed: dict) -> dict:
    per_node = [read_jsonl(p) for p in metrics]
    iters = [[r for r in rows if r.get("event") == "iteration"] for rows in per_node]
    totals = {
        k: sum(r[k] for rows in iters for r in rows) for k in ("started", "finished", "rerouted", "partial", "lost")
    }
    losses = [r["loss"] for r in iters[0]]
    done = all(any(r.get("event") == "done" for r in rows) for rows in per_node)
    summary = {
        "ok": done and totals["lost"] == 0 and len(losses) == args.steps and not group.failed(),
        "steps": len(losses),
        "losses": losses,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "microbatches": totals,
        "crash": crashed,
        "joiner_served": _joiner_served(group),
        "failed_processes": group.failed(),
        "replicas": replica_agreement(iters[0]),
    }
    return summary


def replica_agreement(rows: list[dict]) -> dict[str, int]:
    """From a data node's iteration lines: how many (step, stage) pairs had 2+ replicas report their weights after
    stepping, in how many those weights differed (before the resync that follows), and how many replicas resynced."""
    pairs = [counts for r in rows for counts in r.get("weight_hashes", {}).values() if counts[0] >= 2]
    return {"compared": len(pairs), "differed": sum(1 for _, distinct in pairs if distinct > 1),
            "resynced": sum(r.get("resynced", 0) for r in rows)}  # fmt: skip


def outcome(args: argparse.Namespace, summary: dict) -> str:
    """The demo's last line: what was asked (steps, a crash or none) and what happened (loss, microbatches, the
    crash's recovery, how the nodes ended)."""
    mb, steps = summary["microbatches"], summary["steps"]
    loss = f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}" if steps else "no step finished"
    parts = [
        f"{'done' if summary['ok'] else 'FAILED'}: {steps}/{args.steps} steps, {loss}",
        f"microbatches {mb['finished']}/{mb['started']} finished, {mb['rerouted']} re-routed, {mb['lost']} lost",
    ]
    agree = summary.get("replicas") or {}
    if agree.get("compared"):
        parts.append(f"replicas identical after every step ({agree['compared']} stage-steps compared)" if not
                     agree["differed"] else f"replicas differed at {agree['differed']} of {agree['compared']} "
                     f"stage-steps ({agree['resynced']} resynchronised)")  # fmt: skip
    if args.crash_at < 0:
        parts.append("no crash asked")
    else:
        asked = f"crash asked: stage {args.crash_stage} during {args.crash_phase} of step {args.crash_at}"
        crash = summary["crash"]
        if crash.get("phase", args.crash_phase) != args.crash_phase:  # the demo killed it: the router left it idle
            asked += f" (left unrouted; the demo killed it at step {crash['step']})"
        if not crash:
            parts.append(f"{asked}, and it did not happen (the run ended first)")
        elif crash.get("served_at_step") is not None:
            parts.append(f"{asked}, recovered: the standby volunteer serves since step {crash['served_at_step']}")
        else:
            parts.append(f"{asked}, the stage went on with its other replica; the standby volunteer did not serve")
    exits = summary.get("exits")
    if exits is not None:
        running = sorted(n for n, code in exits.items() if code is None)
        bad = _bad_exits(exits)
        clean = sum(code == 0 for code in exits.values())
        if not running and not bad:
            parts.append(f"{clean} nodes exited 0 by themselves at the run's end")
        if running:
            parts.append(f"still running {EXIT_WAIT_S:g}s after the run's end (stopped): {', '.join(running)}")
        if bad:
            parts.append(f"exited with an error: {', '.join(bad)}")
    if summary["failed_processes"]:
        parts.append(f"failed processes: {summary['failed_processes']}")
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
