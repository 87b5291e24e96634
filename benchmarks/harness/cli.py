"""Crash-injection benchmark: a scenario's swarm as real processes on 127.0.0.1, crashes and joins, a report.

    python -m gwtf.benchmarks.churn --scenario benchmarks/scenarios/geo10.toml --compare router=gwtf,swarm \
        --json runs/geo10.json --plots docs/plots
    python -m gwtf.benchmarks.churn --scenario benchmarks/scenarios/local.toml --json runs/local.json \
        --tensorboard runs/tb          # then: tensorboard --logdir runs/tb (one run per variant)
    python -m gwtf.benchmarks.churn --scenario benchmarks/scenarios/local.toml --dashboard   # watch it: URL printed
    python -m gwtf.benchmarks.churn --scenario benchmarks/scenarios/geo-wide.toml --compare router=gwtf,swarm \
        --repeats 3 --json docs/results/geo-wide.json   # every ratio with its mean and 95 % interval

Every node is a `gwtf` process (bootstrap, relays, data nodes; hivemind DHT + P2P on loopback). With a region a
node's transport emulates that region's links (gwtf.transport.LinkEmulator, real time). A node's compute speed is
emulated too: a relay started with `speed` s and the scenario's `compute_ms` c sleeps c/s ms per forward (2x per
backward, 3x per recompute) in its compute thread, on top of the real (tiny, debug-preset) compute; so its
measured compute time, which the routers read from its record, reflects the emulated speed.

Churn is drawn before the run from the scenario's seed: crashes arrive as a Poisson process of `rate_per_hour`
per relay per *modelled* hour, and `time_scale` modelled seconds pass per wall second (so a few wall minutes see
the crashes of a few modelled hours). A crash is a SIGKILL of the node's process group (the node and its p2pd),
chosen among the live relays by a draw seeded with the event's index; a replacement volunteer with the victim's
region, speed and capacity joins `rejoin_after_s` modelled seconds later and picks its stage itself. An explicit
`[[trace]]` adds crashes and joins at chosen modelled times. With `--compare`, every variant runs the same
scenario, seed, data and event times, one after the other; the victims are the same as long as the live sets are.
With `--repeats N` all of that runs N times, repeat r with seed = the scenario's seed + r (data order, model
initialisation and crash times; the same seed for every variant of a repeat), and the report adds each ratio's
mean and 95 % t-interval over the repeats whose runs are valid (finished, no microbatch lost, no process left).

Everything the harness started is killed by process group at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from gwtf.benchmarks.harness.compare import run_scenario
from gwtf.benchmarks.harness.scenario import load_scenario
from gwtf.errors import UserError
from gwtf.launch.dashboard import DEFAULT_PORT, check_port_flag
from gwtf.tensorboard import check_logdir

PROG = "gwtf.benchmarks.churn"  # the command users run: python -m gwtf.benchmarks.churn


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", required=True, help="a benchmarks/scenarios/*.toml file")
    parser.add_argument("--compare", action="append", default=[], metavar="KEY=V1,V2", help="router or recovery")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--plots", default=None, help="write PNG plots into this folder")
    parser.add_argument("--logs", default="runs/churn", help="node logs and metrics, one folder per run")
    parser.add_argument("--preload", action="store_true",
                        help="fork the gwtf nodes from one process that has imported torch, transformers and "
                        "hivemind (gwtf.launch.zygote), as `gwtf demo` does: a swarm of 20+ nodes then starts on a "
                        "small machine without importing torch 20 times at once")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="override the scenario's steps")
    parser.add_argument("--repeats", type=int, default=1, help="run every variant N times, seeds seed..seed+N-1")
    parser.add_argument("--tensorboard", default=None, metavar="DIR",
                        help="TensorBoard scalars, one run per variant: DIR/<scenario>/<variant>")  # fmt: skip
    parser.add_argument("--dashboard", type=int, nargs="?", const=DEFAULT_PORT, default=None, metavar="PORT",
                        help=f"serve each gwtf variant's live dashboard on 127.0.0.1:PORT (default {DEFAULT_PORT}; "
                        "0: any free port) and print its URL")  # fmt: skip
    args = parser.parse_args(argv)
    from gwtf.benchmarks.harness.report import build_report, print_repeats, print_summary, repeat_summary, write_plots

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` of the harness stops its children like Ctrl-C does
    try:
        sc = load_scenario(args.scenario)
        if args.steps:
            sc.steps = args.steps
        board = check_logdir(args.tensorboard) if args.tensorboard is not None else None
        if args.dashboard is not None:
            check_port_flag(args.dashboard)
        if args.repeats < 1:
            raise UserError(f"--repeats {args.repeats}: need at least 1")
        results, reports = [], []
        for r in range(args.repeats):
            rep = dataclasses.replace(sc, seed=sc.seed + r)
            logs = Path(args.logs) / f"repeat-{r}" if args.repeats > 1 else Path(args.logs)
            out = run_scenario(rep, args.compare, logs, tensorboard=board, dashboard=args.dashboard,
                               preload=args.preload)  # fmt: skip
            results += out
            reports.append(build_report(rep, out))
            print_summary(reports[-1])
        report = reports[0] if args.repeats == 1 else {"repeats": repeat_summary(reports), "reports": reports}
        report["command"] = "python -m gwtf.benchmarks.churn " + shlex.join(argv)  # benchmarks.results_table shows it
        report["commit"] = _commit()
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1))
        if args.plots:
            write_plots(reports[0], Path(args.plots))  # the first repeat's runs, as they happened
        if args.repeats > 1:
            print_repeats(report["repeats"])
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    return 0 if all(r.done and not r.leftover_pids for r in results) else 1


def _commit() -> str | None:
    """The checkout's commit (with "+changes" if its tracked files differ from it), None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], capture_output=True, timeout=10).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")
