"""Crash-injection benchmark: a scenario's swarm as real processes on 127.0.0.1, crashes and joins, a report.

    python -m gwtf.benchmarks.churn --scenario benchmarks/scenarios/geo10.toml --compare router=gwtf,swarm \
        --json runs/geo10.json --plots docs/plots
    python -m gwtf.benchmarks.churn --scenario benchmarks/scenarios/local.toml --json runs/local.json

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

Everything the harness started is killed by process group at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gwtf.errors import UserError
from gwtf.launch.local_swarm import ProcessGroup, read_jsonl, wait_for_file
from gwtf.recovery.config import RecoveryConfig

COMPARE_KEYS = ("router", "recovery", "system")
SYSTEMS = ("gwtf", "deepspeed")  # deepspeed: the static pipeline with checkpoint restart (benchmarks.ds_churn)
SERVING = re.compile(r"serving stage (\d+)")
# the running totals a relay under recovery="redundant" logs after each shadow update (gwtf.recovery.redundant.redundancy_cost)
REDUNDANT_COST = re.compile(r"redundant cost: shadow_bytes=(\d+) redundant_forward_s=([\d.]+) redundant_forwards=(\d+)")


# ---------------------------------------------------------------------------------------------------------------
# scenarios


@dataclass
class NodeSpec:
    """A relay slot: `count` relays of `stage` (None: the joiner picks) in `region`, `speed` x base compute."""

    stage: int | None = None
    region: str | None = None
    speed: float = 1.0
    capacity: int = 4
    count: int = 1

    def __post_init__(self) -> None:
        if self.speed <= 0 or self.capacity < 1 or self.count < 1:
            raise UserError(f"node {self}: speed must be > 0, capacity and count >= 1")


@dataclass
class TraceEvent:
    """`crash` a named relay (`node`) or one of `stage`, or `join` `count` relays, at modelled second `at_s`."""

    at_s: float
    action: str
    node: str | None = None
    stage: int | None = None
    region: str | None = None
    speed: float = 1.0
    capacity: int = 4
    count: int = 1

    def __post_init__(self) -> None:
        if self.action not in ("crash", "join", "stage_loss") or self.at_s < 0:
            raise UserError(f"trace event {self}: action must be crash, join or stage_loss, at_s >= 0")


@dataclass
class Churn:
    """Failure rates per relay (`kind = "node"`) or per stage (`"stage"`: every replica at once) per modelled hour."""

    rate_per_hour: float = 0.0
    kind: str = "node"
    rejoin_after_s: float | None = 300.0  # modelled seconds until a replacement joins (None: never)
    min_per_stage: int = 1  # a node crash never takes a stage below this many serving replicas

    def __post_init__(self) -> None:
        if self.kind not in ("node", "stage") or not 0 <= self.rate_per_hour < 100:
            raise UserError(f"churn {self}: kind is node or stage, rate_per_hour a fraction (0.1 = 10 %/h)")


@dataclass
class Scenario:
    name: str
    preset: str = "debug"
    stages: int = 3
    steps: int = 40
    target_loss: float | None = None
    seed: int = 0
    time_scale: float = 1.0  # modelled seconds per wall second
    router: str = "gwtf"
    recovery: str = "checkfree"
    compute_ms: float = 0.0  # emulated compute per microbatch forward at speed 1
    data_nodes: int = 1
    data_region: str | None = None
    timeout_s: float = 600.0  # one run's wall-clock limit
    overrides: list[str] = field(default_factory=list)  # run config `section.key=value` (every run setting)
    nodes: list[NodeSpec] = field(default_factory=list)
    churn: Churn = field(default_factory=Churn)
    trace: list[TraceEvent] = field(default_factory=list)
    checkpoint_every: int = 10  # the DeepSpeed baseline's checkpoint interval, in steps

    def __post_init__(self) -> None:
        if (
            self.time_scale <= 0
            or self.steps < 1
            or self.data_nodes < 1
            or self.compute_ms < 0
            or self.checkpoint_every < 1
        ):
            raise UserError(
                f"scenario {self.name}: time_scale, steps, data_nodes, checkpoint_every positive; compute_ms >= 0"
            )
        missing = sorted(set(range(1, self.stages + 1)) - {n.stage for n in self.nodes})
        if missing:
            raise UserError(f"scenario {self.name}: stages {missing} have no relay in [[nodes]]")

    def wall(self, modelled_s: float) -> float:
        return modelled_s / self.time_scale

    @property
    def relays(self) -> int:
        return sum(n.count for n in self.nodes)


def load_scenario(path: str | Path) -> Scenario:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise UserError(f"scenario {path} not found; see benchmarks/scenarios/") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"scenario {path} is not valid TOML: {exc}") from exc
    raw.setdefault("name", Path(path).stem)
    try:
        return Scenario(
            **{k: v for k, v in raw.items() if k not in ("nodes", "churn", "trace")},
            nodes=[NodeSpec(**n) for n in raw.get("nodes", [])],
            churn=Churn(**raw.get("churn", {})),
            trace=[TraceEvent(**t) for t in raw.get("trace", [])],
        )
    except TypeError as exc:
        raise UserError(f"scenario {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------
# the event schedule (drawn once per scenario: the same for every compared run)


@dataclass
class Event:
    t: float  # wall seconds after the first iteration
    action: str  # crash | join | stage_loss
    origin: str  # rate | trace | rejoin
    index: int = 0
    node: str | None = None
    stage: int | None = None
    slot: NodeSpec | None = None


def draw_events(sc: Scenario, horizon_s: float) -> list[Event]:
    """Rate crashes (Poisson, seeded) and the trace, in wall seconds up to `horizon_s`; rejoins come at run time."""
    rng = random.Random(sc.seed)
    per_s = sc.churn.rate_per_hour / 3600 * sc.time_scale
    per_s *= sc.relays if sc.churn.kind == "node" else sc.stages
    events, t = [], 0.0
    action = "crash" if sc.churn.kind == "node" else "stage_loss"
    while per_s > 0:
        t += rng.expovariate(per_s)
        if t > horizon_s:
            break
        events.append(Event(t, action, "rate"))
    for ev in sc.trace:
        slot = NodeSpec(ev.stage, ev.region, ev.speed, ev.capacity, ev.count)
        events.append(Event(sc.wall(ev.at_s), ev.action, "trace", node=ev.node, stage=ev.stage, slot=slot))
    events.sort(key=lambda e: e.t)
    for i, ev in enumerate(events):
        ev.index = i
    return events


# ---------------------------------------------------------------------------------------------------------------
# processes


@dataclass
class Relay:
    name: str
    slot: NodeSpec
    stage: int | None  # None until a joiner says which stage it serves
    alive: bool = True
    serving: bool = False


class Launcher(ProcessGroup):
    """A ProcessGroup whose children go through `gwtf.benchmarks.churn node` (emulated compute speed), and
    whose kills take the whole process group (a node and its p2pd), as a machine's crash would."""

    def start_node(self, name: str, argv: list[str], speed: float = 1.0, compute_ms: float = 0.0) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        out = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 (the child holds it)
        wrapper = ["node", "--speed", str(speed), "--compute-ms", str(compute_ms)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "gwtf.benchmarks.churn", *wrapper, "--", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        out.close()
        self.procs[name] = proc
        return proc

    def crash(self, name: str) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self, grace: float = 5.0) -> None:
        super().stop_all(grace)
        for proc in self.procs.values():  # leftovers of a group (p2pd) after its leader exited
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# one run


@dataclass
class RunResult:
    variant: dict[str, str]
    scenario: str
    rows: list[dict]  # data node 0's iteration lines, with `t` (wall seconds after t0) added
    other_rows: list[list[dict]]  # the other data nodes' iteration lines
    events: list[dict]  # what the harness did, with `t`
    t0: float  # unix time of the first iteration's start
    wall_s: float
    done: bool
    failed: list[str]
    leftover_pids: list[int]
    tokens_per_iteration: int
    log_dir: str
    redundancy: dict[str, float] | None = None  # recovery="redundant": the extra work the shadows cost (all relays)


class Run:
    def __init__(self, sc: Scenario, variant: dict[str, str], log_dir: Path, events: list[Event]):
        self.sc, self.variant, self.log_dir = sc, variant, log_dir
        self.pending = [dataclasses.replace(e) for e in events]
        self.group = Launcher(log_dir)
        self.relays: dict[str, Relay] = {}
        self.done_events: list[dict] = []
        self.joiners = 0
        self.recovery = variant.get("recovery", sc.recovery)

    # ---- start -------------------------------------------------------------------------------------------------
    def start(self) -> list[str]:
        run_id = f"churn-{self.sc.name}-{os.getpid()}-{'-'.join(self.variant.values()) or 'base'}"
        addr_file = self.log_dir / "initial_peers.txt"
        router = self.variant.get("router", self.sc.router)
        sets = [f"train.steps={self.sc.steps}", f"train.seed={self.sc.seed}", f"recovery.strategy={self.recovery}",
                *self.sc.overrides]  # fmt: skip
        argv = ["bootstrap", "--run", run_id, "--preset", self.sc.preset, "--stages", str(self.sc.stages),
                "--data-nodes", str(self.sc.data_nodes), "--router", router, "--addr-file", str(addr_file)]  # fmt: skip
        self.group.start_node("bootstrap", argv + sum((["--set", s] for s in sets), []))
        peers = wait_for_file(addr_file, self.group, 90).split()
        join = ["join", "--run", run_id, "--initial-peers", *peers, "--join-timeout", "120"]
        for slot in self.sc.nodes:
            for i in range(slot.count):
                self._start_relay(f"relay-s{slot.stage}-{len(self.relays)}-{i}", slot, join)
        self._wait_serving(list(self.relays), timeout=180)  # the scenario's starting swarm is in place first
        for rank in range(self.sc.data_nodes):
            argv = [*join, "--role", "data", "--rank", str(rank), "--metrics", str(self._metrics(rank))]
            if self.sc.data_region:
                argv += ["--region", self.sc.data_region]
            self.group.start_node(f"data-{rank}", argv)
        return join

    def _start_relay(self, name: str, slot: NodeSpec, join: list[str]) -> None:
        argv = [*join, "--role", "relay", "--capacity", str(slot.capacity)]
        if slot.stage is not None:
            argv += ["--stage", str(slot.stage)]
        if slot.region:
            argv += ["--region", slot.region]
        self.group.start_node(name, argv, slot.speed, self.sc.compute_ms)
        self.relays[name] = Relay(name, slot, slot.stage)

    def _wait_serving(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._learn_stages()
            if all(self.relays[n].serving for n in names):
                return
            if self.group.failed():
                raise UserError(f"{self.group.failed()} exited early; see {self.log_dir}")
            time.sleep(0.2)
        raise UserError(f"relays not serving within {timeout:.0f}s; see the logs in {self.log_dir}")

    def _metrics(self, rank: int) -> Path:
        return self.log_dir / f"data-{rank}.jsonl"

    # ---- events ------------------------------------------------------------------------------------------------
    def fire_due(self, t: float, join: list[str]) -> None:
        while self.pending and self.pending[0].t <= t:
            ev = self.pending.pop(0)
            outcome = getattr(self, f"_do_{ev.action}")(ev, join)
            self.done_events.append({"t": round(t, 3), "planned_t": round(ev.t, 3), "action": ev.action,
                                     "origin": ev.origin, **outcome})  # fmt: skip
            print(f"  ** {ev.action} ({ev.origin}) at {t:.1f}s: {outcome}", flush=True)

    def _serving(self) -> dict[int, list[str]]:
        self._learn_stages()
        by_stage: dict[int, list[str]] = {k: [] for k in range(1, self.sc.stages + 1)}
        for r in self.relays.values():
            if r.alive and r.serving and r.stage is not None:
                by_stage[r.stage].append(r.name)
        return by_stage

    def _learn_stages(self) -> None:
        for r in self.relays.values():  # a relay's stage counts once it serves (it prints "serving stage K")
            if r.alive and not r.serving:
                match = SERVING.search((self.log_dir / f"{r.name}.log").read_text(errors="replace"))
                r.serving, r.stage = (True, int(match.group(1))) if match else (False, r.stage)

    def _do_crash(self, ev: Event, join: list[str]) -> dict:
        by_stage = self._serving()
        if ev.node is not None:
            victims = [ev.node] if ev.node in self.relays and self.relays[ev.node].alive else []
        else:
            candidates = [n for k, ns in by_stage.items() if ev.stage in (None, k) for n in ns]
            victims = [n for n in sorted(candidates)
                       if len(by_stage[self.relays[n].stage or 0]) > self.sc.churn.min_per_stage]  # fmt: skip
            victims = [random.Random(self.sc.seed * 7919 + ev.index).choice(victims)] if victims else []
        if not victims:
            return {"skipped": "no eligible live relay (min_per_stage protects the last replicas)"}
        return self._kill(victims, ev)

    def _do_stage_loss(self, ev: Event, join: list[str]) -> dict:
        by_stage = self._serving()
        stage = ev.stage or random.Random(self.sc.seed * 7919 + ev.index).randint(1, self.sc.stages)
        if not by_stage[stage]:
            return {"skipped": f"stage {stage} has no serving relay"}
        return self._kill(sorted(by_stage[stage]), ev)

    def _kill(self, victims: list[str], ev: Event) -> dict:
        for name in victims:
            self.group.crash(name)
            self.relays[name].alive = False
        stage = self.relays[victims[0]].stage
        if self.sc.churn.rejoin_after_s is not None and ev.origin == "rate":
            for name in victims:
                slot = dataclasses.replace(self.relays[name].slot, stage=None, count=1)
                when = ev.t + self.sc.wall(self.sc.churn.rejoin_after_s)
                self._schedule(Event(when, "join", "rejoin", index=ev.index, slot=slot))
        return {"victims": victims, "stage": stage}

    def _schedule(self, ev: Event) -> None:
        self.pending.append(ev)
        self.pending.sort(key=lambda e: e.t)

    def _do_join(self, ev: Event, join: list[str]) -> dict:
        slot = ev.slot or NodeSpec()
        names = []
        for _ in range(slot.count):
            name = f"joiner-{self.joiners}"
            self.joiners += 1
            self._start_relay(name, dataclasses.replace(slot, count=1), join)
            names.append(name)
        return {"joiners": names, "stage": slot.stage, "region": slot.region, "speed": slot.speed}

    # ---- the loop ----------------------------------------------------------------------------------------------
    def execute(self) -> RunResult:
        t_start = time.time()
        t0, done = t_start, False
        try:
            join = self.start()
            t0 = self._wait_first_iteration()
            done = self._monitor(t0, join)
        except UserError as exc:  # this variant failed (a node exited early...): a result, the others still run
            print(f"  !! {exc}", flush=True)
        finally:
            self.group.stop_all()
        leftover = leftovers({p.pid for p in self.group.procs.values()})
        rows = [self._rows(r, t0) for r in range(self.sc.data_nodes)]
        redundancy = None
        if self.recovery == "redundant":  # its shadows' cost, which the relays log
            redundancy = redundancy_cost([self.log_dir / f"{name}.log" for name in self.relays])
        return RunResult(
            variant=self.variant, scenario=self.sc.name, rows=rows[0], other_rows=rows[1:],
            events=self.done_events, t0=t0, wall_s=time.time() - t_start, done=done, failed=self.group.failed(),
            leftover_pids=leftover, tokens_per_iteration=_tokens_per_iteration(self.sc), log_dir=str(self.log_dir),
            redundancy=redundancy,
        )  # fmt: skip

    def _wait_first_iteration(self) -> float:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            rows = _iterations(self._metrics(0))
            if rows:
                return rows[0]["time"] - rows[0]["seconds"]
            if self.group.failed():
                raise UserError(f"{self.group.failed()} exited early; see {self.log_dir}")
            time.sleep(0.2)
        raise UserError(f"no iteration within 180 s; see the logs in {self.log_dir}")

    def _monitor(self, t0: float, join: list[str]) -> bool:
        shown, deadline = 0, time.monotonic() + self.sc.timeout_s
        while time.monotonic() < deadline:
            self.fire_due(time.time() - t0, join)
            rows = _iterations(self._metrics(0))
            for row in rows[shown:]:
                self._progress(row, t0)
            shown = len(rows)
            if all(_done(self._metrics(r)) for r in range(self.sc.data_nodes)):
                return True
            data_failed = [n for n in self.group.failed() if n.startswith(("data", "bootstrap"))]
            if data_failed:
                print(f"  !! {data_failed} failed; see {self.log_dir}", flush=True)
                return False
            time.sleep(0.2)
        print(f"  !! timed out after {self.sc.timeout_s:.0f}s", flush=True)
        return False

    def _progress(self, row: dict, t0: float) -> None:
        label = ",".join(f"{k}={v}" for k, v in self.variant.items()) or "base"
        crashes = sum(1 for e in self.done_events if e["action"] != "join" and "victims" in e)
        print(f"[{self.sc.name} {label}] t={row['time'] - t0:6.1f}s step {row['iteration'] + 1:4d}/{self.sc.steps} "
              f"loss {row['loss']:.3f} {row['tokens_per_s']:7.0f} tok/s live/stage {row['live_per_stage']} "
              f"crashes {crashes} rerouted {row['rerouted']} lost {row['lost']}", flush=True)  # fmt: skip

    def _rows(self, rank: int, t0: float) -> list[dict]:
        return [{**r, "t": r["time"] - t0} for r in _iterations(self._metrics(rank))]


def _tokens_per_iteration(sc: Scenario) -> int:
    from gwtf.config import load_config

    cfg = load_config(None, [f"preset={sc.preset}", *sc.overrides])
    t = cfg.train
    return t.microbatches_per_step * t.microbatch_size * cfg.model_config().seq_len


def _iterations(path: Path) -> list[dict]:
    return [r for r in read_jsonl(path) if r.get("event") == "iteration"]


def _done(path: Path) -> bool:
    return any(r.get("event") == "done" for r in read_jsonl(path))


def redundancy_cost(logs: list[Path]) -> dict[str, float]:
    """What redundant computation cost every relay together (the crashed ones too, up to their last log line):
    shadow state received, and the redundant forwards' count and seconds (real compute plus emulated delay)."""
    total = {"shadow_bytes": 0.0, "redundant_forward_s": 0.0, "redundant_forwards": 0.0}
    for path in logs:
        last = REDUNDANT_COST.findall(path.read_text(errors="replace")) if path.exists() else []
        if last:
            fetched, seconds, forwards = last[-1]
            total["shadow_bytes"] += int(fetched)
            total["redundant_forward_s"] += float(seconds)
            total["redundant_forwards"] += int(forwards)
    return total


def leftovers(pgids: set[int]) -> list[int]:
    """Pids of anything still alive in the process groups `pgids` the harness started (should be none)."""
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) in pgids and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
    return alive


# ---------------------------------------------------------------------------------------------------------------
# variants and the CLI


def variants(compares: list[str]) -> list[dict[str, str]]:
    """`router=gwtf,swarm` x `recovery=checkfree,copy` -> every combination, in the given order. Router and
    recovery are gwtf's settings: a `system=deepspeed` variant drops them and appears once."""
    axes = []
    for spec in compares:
        key, sep, values = spec.partition("=")
        if not sep or key not in COMPARE_KEYS or not values:
            raise UserError(f"--compare {spec!r}: use KEY=V1,V2 with KEY one of {', '.join(COMPARE_KEYS)}")
        if key == "system" and set(values.split(",")) - set(SYSTEMS):
            raise UserError(f"--compare {spec!r}: systems are {', '.join(SYSTEMS)}")
        axes.append([(key, v) for v in values.split(",") if v])
    out: list[dict[str, str]] = []
    for combo in itertools.product(*axes) if axes else [()]:
        variant = dict(combo)
        if variant.get("system") == "deepspeed":
            variant = {"system": "deepspeed"}
        if variant not in out:
            out.append(variant)
    return out


def run_scenario(sc: Scenario, compares: list[str], log_root: Path) -> list[RunResult]:
    for name in {v.get("recovery", sc.recovery) for v in variants(compares)}:
        RecoveryConfig(strategy=name)  # refused here, not as a node that exits in the middle of a run
    events = draw_events(sc, sc.timeout_s)
    results = []
    for variant in variants(compares):
        label = "-".join(variant.values()) or "base"
        log_dir = log_root / f"{sc.name}-{label}"
        log_dir.mkdir(parents=True, exist_ok=True)
        for stale in log_dir.glob("*"):
            if stale.is_file():
                stale.unlink()
        print(f"== {sc.name} [{label}]: {sc.relays} relays over {sc.stages} stages, {sc.data_nodes} data node(s), "
              f"{sc.steps} steps, {len(events)} planned events; logs in {log_dir}", flush=True)  # fmt: skip
        if variant.get("system", "gwtf") == "deepspeed":
            from gwtf.benchmarks.ds_churn import DeepSpeedRun

            results.append(DeepSpeedRun(sc, variant, log_dir, events).execute())
        else:
            results.append(Run(sc, variant, log_dir, events).execute())
    return results


def _node_main(argv: list[str]) -> int:
    """`python -m gwtf.benchmarks.churn node --speed S --compute-ms C -- GWTF-ARGS`: a gwtf process with emulated
    compute speed (relays)."""
    parser = argparse.ArgumentParser(prog="gwtf.benchmarks.churn node")
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--compute-ms", type=float, default=0.0)
    parser.add_argument("gwtf", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    gwtf_argv = args.gwtf[1:] if args.gwtf[:1] == ["--"] else args.gwtf
    if args.compute_ms > 0 and "relay" in gwtf_argv:
        _emulate_compute(args.compute_ms / 1000 / args.speed)
    from gwtf.launch.cli import main

    return main(gwtf_argv)


def _emulate_compute(forward_s: float) -> None:
    """Stretch a relay's forward/backward/recompute as on a device `speed` times the base one (sleeping in the
    compute thread holds it busy like real work, without taking CPU from the other processes on this machine)."""
    from gwtf.recovery.redundant import Shadow
    from gwtf.stage import StageReplica

    slow = [(StageReplica, "forward", 1), (StageReplica, "backward", 2), (StageReplica, "recompute_backward", 3),
            (Shadow, "forward", 1)]  # recovery="redundant": a shadow's forward costs one more forward  # fmt: skip
    for cls, name, factor in slow:
        original = getattr(cls, name)

        def slowed(self, *a, _original=original, _s=forward_s * factor):
            out = _original(self, *a)
            time.sleep(_s)
            return out

        setattr(cls, name, slowed)


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["node"]:
        return _node_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", required=True, help="a benchmarks/scenarios/*.toml file")
    parser.add_argument("--compare", action="append", default=[], metavar="KEY=V1,V2", help="router or recovery")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--plots", default=None, help="write PNG plots into this folder")
    parser.add_argument("--logs", default="runs/churn", help="node logs and metrics, one folder per run")
    parser.add_argument("--steps", type=int, default=None, help="override the scenario's steps")
    args = parser.parse_args(argv)
    from gwtf.benchmarks.report import build_report, print_summary, write_plots

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` of the harness stops its children like Ctrl-C does
    try:
        sc = load_scenario(args.scenario)
        if args.steps:
            sc.steps = args.steps
        results = run_scenario(sc, args.compare, Path(args.logs))
        report = build_report(sc, results)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1))
        if args.plots:
            write_plots(report, Path(args.plots))
        print_summary(report)
    except UserError as exc:
        print(f"gwtf.benchmarks.churn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gwtf.benchmarks.churn: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    return 0 if all(r.done and not r.leftover_pids for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
