"""Soak run: a local swarm of processes under churn for M minutes; resources over time, crashes, leftovers.

    python -m gwtf.benchmarks.soak --minutes 30 --json runs/soak.json
    python -m gwtf.benchmarks.soak --minutes 3 --churn-per-hour 0.33 --time-scale 20 --json runs/soak-short.json

A keyed run (bootstrap --key, every join --key) of the debug model: `--stages` x `--replicas` relays and one data
node that trains until the time is up. Crashes arrive as a Poisson process of `--churn-per-hour` per relay per
modelled hour (`--time-scale` modelled seconds per wall second; seeded); a crash SIGKILLs the victim's whole process
group (the node and its p2pd daemon: the machine is gone), and a replacement volunteer joins `--rejoin-after-s`
later and picks its stage itself. Every process a node starts inherits its environment, where the harness marks
it (GWTF_SOAK=<run>, GWTF_SOAK_NODE=<node>), so a node's processes are found even when they left its process tree
(torch_shm_manager daemons, a DHT process orphaned by a crash). Every `--sample-s` seconds the harness records,
per node (all its processes), the resident memory, open file descriptors and threads. The report (JSON, and a
summary on stdout):

    iterations, crashes survived, microbatches started/finished/lost (lost must be 0),
    per node: peak RSS, fds and threads, first-quarter vs last-quarter means (must not grow),
    processes left behind after the swarm is stopped (must be 0; they are killed by pid if any).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from gwtf.launch.processes import ProcessGroup

log = logging.getLogger("soak")


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    threads: int
    procs: int


@dataclass
class Soak:
    args: argparse.Namespace
    group: ProcessGroup
    run_id: str = field(default_factory=lambda: f"soak-{os.getpid()}")
    join: list[str] = field(default_factory=list)
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    seen: dict[int, float] = field(default_factory=dict)  # pid -> create_time of every process of the swarm
    crashes: list[dict[str, Any]] = field(default_factory=list)
    pending_joins: list[float] = field(default_factory=list)
    n_joiners: int = 0
    t0: float = field(default_factory=time.monotonic)

    # --- the swarm

    def launch(self, name: str, argv: list[str]) -> None:
        marks = {"GWTF_SOAK": self.run_id, "GWTF_SOAK_NODE": name}  # inherited by every process the node starts
        self.group.start(name, argv, env=marks)

    def start(self) -> None:
        a, out = self.args, self.group.log_dir
        key, addr = out / "run.key", out / "initial_peers.txt"
        steps = ["--set", "train.steps=1000000", "--set", f"train.seed={a.seed}", "--set", "train.eval_every=0"]
        self.launch(
            "bootstrap",
            ["bootstrap", "--run", self.run_id, "--preset", "debug", "--stages", str(a.stages), "--key", str(key),
             "--router", "round-robin", "--addr-file", str(addr), *steps],
        )  # fmt: skip
        peers = self.group.wait_for_address(addr, 90)
        self.join = ["join", "--run", self.run_id, "--initial-peers", *peers, "--key", str(key)]
        for stage in range(1, a.stages + 1):
            for r in range(a.replicas):
                self.launch(f"relay-s{stage}-{r}", [*self.join, "--role", "relay", "--stage", str(stage)])
        self.launch("data-0", [*self.join, "--role", "data", "--metrics", str(out / "data-0.jsonl")])

    def relays(self) -> list[str]:
        return [n for n, p in self.group.procs.items() if n != "data-0" and n != "bootstrap" and p.poll() is None]

    def crash(self, rng: random.Random) -> None:
        live = sorted(self.relays())
        if not live:
            return
        victim = rng.choice(live)
        tree = self.processes().get(victim, [])  # the node, its DHT process, p2pd, torch_shm_manager
        self.group.kill(victim)  # its process group: SIGKILL, then reaped
        for p in tree:  # the machine is gone: nothing of it survives, also what left its process group
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.crashes.append({"t": round(self.elapsed(), 1), "victim": victim, "iteration": self.iterations()})
        self.pending_joins.append(self.elapsed() + self.args.rejoin_after_s)
        log.info("crash %d: %s SIGKILLed at %.0fs", len(self.crashes), victim, self.elapsed())

    def rejoin_due(self) -> None:
        due = [t for t in self.pending_joins if t <= self.elapsed()]
        for t in due:
            self.pending_joins.remove(t)
            self.n_joiners += 1
            self.launch(f"joiner-{self.n_joiners}", [*self.join, "--role", "relay"])

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def iterations(self) -> int:
        return len(_iteration_rows(self.group.log_dir / "data-0.jsonl"))

    # --- measurements

    def processes(self) -> dict[str, list[psutil.Process]]:
        """Every live process of the swarm by node, found by the mark in its environment."""
        found: dict[str, list[psutil.Process]] = {}
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                env = p.environ()
                if env.get("GWTF_SOAK") == self.run_id and p.pid != os.getpid():
                    found.setdefault(env.get("GWTF_SOAK_NODE", "?"), []).append(p)
        return found

    def sample(self) -> None:
        t = round(self.elapsed(), 1)
        by_node = self.processes()
        for name, proc in self.group.procs.items():
            if proc.poll() is not None:
                continue
            tree = by_node.get(name, [])
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    self.seen.setdefault(p.pid, p.create_time())
            rss, fds, threads = 0, 0, 0
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
                    fds += p.num_fds()
                    threads += p.num_threads()
            self.samples.setdefault(name, []).append(Sample(t, round(rss / 2**20, 1), fds, threads, len(tree)))

    def leftovers(self) -> list[psutil.Process]:
        """Processes of the swarm still alive after it was stopped: marked ones, and any seen in a node's tree
        (same pid and start time: not a reused pid)."""
        alive = {p.pid: p for procs in self.processes().values() for p in procs if p.status() != psutil.STATUS_ZOMBIE}
        for pid, created in self.seen.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive[pid] = p
        return list(alive.values())


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:120]}"
    except psutil.Error:
        return str(p.pid)


def _iteration_rows(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if row.get("event") == "iteration":
                    rows.append(row)
    return rows


def crash_times(args: argparse.Namespace, rng: random.Random) -> list[float]:
    """Wall times of crashes: Poisson, `churn_per_hour` per relay per modelled hour (the relay count is held
    constant by the rejoins)."""
    rate = args.churn_per_hour * args.stages * args.replicas * args.time_scale / 3600.0  # per wall second
    times, t = [], args.warmup_s
    while rate > 0:
        t += rng.expovariate(rate)
        if t >= args.minutes * 60:
            return times
        times.append(t)
    return times


def trend(series: list[Sample], attr: str, settle_s: float = 60.0) -> dict[str, float]:
    """Peak and the means of the first and last quarters of the samples, leaving out a node's first `settle_s`
    seconds (start-up: imports, model build, state download)."""
    values = [getattr(s, attr) for s in series if s.t >= series[0].t + settle_s] or [getattr(s, attr) for s in series]
    q = max(1, len(values) // 4)
    first, last = statistics.fmean(values[:q]), statistics.fmean(values[-q:])
    return {"peak": max(values), "first_quarter": round(first, 1), "last_quarter": round(last, 1),
            "growth": round(last / first - 1.0, 3) if first else 0.0}  # fmt: skip


def report(soak: Soak, leftovers: list[psutil.Process]) -> dict[str, Any]:
    rows = _iteration_rows(soak.group.log_dir / "data-0.jsonl")
    totals = {k: sum(int(r.get(k, 0)) for r in rows) for k in ("started", "finished", "rerouted", "partial", "lost")}
    nodes = {}
    for name, series in soak.samples.items():
        nodes[name] = {
            "lived_s": [series[0].t, series[-1].t],
            "crashed": any(c["victim"] == name for c in soak.crashes),
            "rss_mb": trend(series, "rss_mb"),
            "fds": trend(series, "fds"),
            "threads": trend(series, "threads"),
            "series": [[s.t, s.rss_mb, s.fds, s.threads, s.procs] for s in series],
        }
    return {
        "minutes": soak.args.minutes,
        "churn_per_hour": soak.args.churn_per_hour,
        "time_scale": soak.args.time_scale,
        "swarm": f"{soak.args.stages} stages x {soak.args.replicas} replicas + 1 data node (keyed run)",
        "iterations": len(rows),
        "first_loss": rows[0]["loss"] if rows else None,
        "last_loss": rows[-1]["loss"] if rows else None,
        "crashes": soak.crashes,
        "crashes_survived": len(soak.crashes) if rows and rows[-1]["iteration"] >= 0 else 0,
        "joiners": soak.n_joiners,
        "microbatches": totals,
        "failed_processes": [n for n in soak.group.failed() if not any(c["victim"] == n for c in soak.crashes)],
        "processes_left_behind": len(leftovers),
        "left_behind": [_describe(p) for p in leftovers],
        "nodes": nodes,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*"):
        if stale.is_file():
            stale.unlink()
    rng = random.Random(args.seed)
    crashes = crash_times(args, rng)
    soak = Soak(args, ProcessGroup(out))
    log.info("soak %g min, %d crash(es) drawn at %s s", args.minutes, len(crashes), [round(t) for t in crashes])
    try:
        soak.start()
        next_sample = 0.0
        while soak.elapsed() < args.minutes * 60:
            if crashes and soak.elapsed() >= crashes[0]:
                crashes.pop(0)
                soak.crash(rng)
            soak.rejoin_due()
            if soak.elapsed() >= next_sample:
                soak.sample()
                next_sample += args.sample_s
                log.info("t=%4.0fs iterations %d crashes %d", soak.elapsed(), soak.iterations(), len(soak.crashes))
            if soak.group.procs["data-0"].poll() is not None:
                log.error("the data node exited (%s); see %s", soak.group.procs["data-0"].returncode, out)
                break
            time.sleep(0.5)
        soak.sample()
    finally:
        soak.group.stop_all(grace=15)  # by process group: the nodes' p2pd daemons too
    time.sleep(2.0)  # daemons notice their parent is gone
    leftovers = soak.leftovers()
    result = report(soak, leftovers)
    for p in leftovers:  # ours (recorded in the swarm's process trees): end them by pid
        with contextlib.suppress(psutil.Error):
            p.kill()
    return result


def print_summary(r: dict[str, Any]) -> None:
    mb = r["microbatches"]
    print(f"soak {r['minutes']} min ({r['swarm']}), churn {r['churn_per_hour']}/h x time scale {r['time_scale']}")
    print(f"iterations {r['iterations']}  loss {r['first_loss']} -> {r['last_loss']}")
    print(f"crashes survived {r['crashes_survived']}  joiners {r['joiners']}  microbatches {mb}")
    print(f"processes left behind {r['processes_left_behind']}  failed processes {r['failed_processes']}")
    print(f"{'node':<12} {'rss MB peak':>11} {'first->last q':>15} {'fds peak':>8} {'first->last':>13} "
          f"{'thr peak':>8} {'first->last':>13}")  # fmt: skip
    for name, n in r["nodes"].items():
        m, f, t = n["rss_mb"], n["fds"], n["threads"]
        print(
            f"{name:<12} {m['peak']:>11.1f} {m['first_quarter']:>7.1f}->{m['last_quarter']:<7.1f} {f['peak']:>8} "
            f"{f['first_quarter']:>6.1f}->{f['last_quarter']:<6.1f} {t['peak']:>8} "
            f"{t['first_quarter']:>6.1f}->{t['last_quarter']:<6.1f}"
        )


def _interrupted(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--json", required=True, help="write the report here")
    parser.add_argument("--out", default="runs/soak", help="node logs and metrics")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--churn-per-hour", type=float, default=0.33, help="crashes per relay per modelled hour")
    parser.add_argument("--time-scale", type=float, default=1.0, help="modelled seconds per wall second")
    parser.add_argument("--rejoin-after-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=60.0, help="no crash before this")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _interrupted)  # the swarm is stopped and reported in run()'s finally
    result = run(args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print_summary(result)
    return 0 if result["microbatches"]["lost"] == 0 and result["processes_left_behind"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
