"""One scenario run of the gwtf swarm under churn: every node a `gwtf` process on 127.0.0.1 (bootstrap, relays, data
nodes; hivemind DHT + P2P on loopback), started through the process launcher (gwtf.launch.processes) with an
emulated compute speed (benchmarks.harness.emulated_node); crashes, stage losses and joins fired on the schedule.

A crash is a SIGKILL of the node's process group (the node and its p2pd), chosen among the live relays by a draw
seeded with the event's index; a replacement volunteer with the victim's region, speed and capacity joins
`rejoin_after_s` modelled seconds later and picks its stage itself. Everything the run started is stopped by process
group at the end, whatever happens.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from gwtf.benchmarks.harness import emulated_node
from gwtf.benchmarks.harness.events import Event, victim_draw
from gwtf.benchmarks.harness.results import RunResult, is_done, iterations
from gwtf.benchmarks.harness.scenario import NodeSpec, Scenario
from gwtf.benchmarks.harness.settings import recovery_of, router_of, swarm_settings_argv, tokens_per_iteration
from gwtf.errors import UserError
from gwtf.launch.dashboard import dashboard_url, start_dashboard
from gwtf.launch.processes import ProcessGroup

SERVING = re.compile(r"serving stage (\d+)")
# the running totals a relay under recovery="redundant" logs after each shadow update
# (gwtf.recovery.redundant.redundancy_cost)
REDUNDANT_COST = re.compile(r"redundant cost: shadow_bytes=(\d+) redundant_forward_s=([\d.]+) redundant_forwards=(\d+)")


@dataclass
class Relay:
    name: str
    slot: NodeSpec
    stage: int | None  # None until a joiner says which stage it serves
    alive: bool = True
    serving: bool = False


class SwarmRun:
    def __init__(
        self,
        sc: Scenario,
        variant: dict[str, str],
        log_dir: Path,
        events: list[Event],
        tensorboard: Path | None = None,
        dashboard: int | None = None,
        preload: bool = False,
    ):
        self.sc, self.variant, self.log_dir = sc, variant, log_dir
        self.tensorboard = tensorboard  # data node 0's TensorBoard run (the others' in its data-R subfolders)
        self.dashboard = dashboard  # the port of this run's live dashboard (gwtf.launch.dashboard), if any
        self.pending = [dataclasses.replace(e) for e in events]
        self.group = ProcessGroup(log_dir, preload=preload)  # preload: nodes forked from a zygote
        self.relays: dict[str, Relay] = {}
        self.done_events: list[dict] = []
        self.joiners = 0
        self.recovery = recovery_of(sc, variant)
        self.t0: float | None = None  # unix time of the first iteration's start, once known
        self.timeline: list[dict] = []  # relays starting to serve (+1) and killed (-1), as the harness saw them

    # ---- start -------------------------------------------------------------------------------------------------
    def start(self) -> list[str]:
        run_id = f"churn-{self.sc.name}-{os.getpid()}-{'-'.join(self.variant.values()) or 'base'}"
        addr_file = self.log_dir / "initial_peers.txt"
        argv = ["bootstrap", "--run", run_id, "--preset", self.sc.preset, "--stages", str(self.sc.stages),
                "--data-nodes", str(self.sc.data_nodes), "--router", router_of(self.sc, self.variant),
                "--addr-file", str(addr_file)]  # fmt: skip
        self._start_node("bootstrap", argv + swarm_settings_argv(self.sc, self.variant))
        peers = self.group.wait_for_address(addr_file, 90)
        if self.dashboard is not None:  # it starts while the relays do, and sees every one join
            start_dashboard(self.group, peers, run_id, self.dashboard)
        join = ["join", "--run", run_id, "--initial-peers", *peers, "--join-timeout", "120"]
        for slot in self.sc.nodes:
            for i in range(slot.count):
                self._start_relay(f"relay-s{slot.stage}-{len(self.relays)}-{i}", slot, join)
        self._wait_serving(list(self.relays), timeout=180)  # the scenario's starting swarm is in place first
        if self.dashboard is not None:
            print(f"  dashboard: {dashboard_url(self.group)}", flush=True)
        for rank in range(self.sc.data_nodes):
            argv = [*join, "--role", "data", "--rank", str(rank), "--metrics", str(self._metrics(rank))]
            if self.sc.data_region:
                argv += ["--region", self.sc.data_region]
            if self.tensorboard is not None:
                argv += ["--tensorboard", str(self.tensorboard / f"data-{rank}" if rank else self.tensorboard)]
            self._start_node(f"data-{rank}", argv)
        return join

    def _start_node(self, name: str, argv: list[str], speed: float = 1.0, compute_ms: float = 0.0) -> None:
        self.group.start(name, argv, entry=emulated_node.entry(speed, compute_ms))

    def _start_relay(self, name: str, slot: NodeSpec, join: list[str]) -> None:
        argv = [*join, "--role", "relay", "--capacity", str(slot.capacity)]
        if slot.stage is not None:
            argv += ["--stage", str(slot.stage)]
        if slot.region:
            argv += ["--region", slot.region]
        self._start_node(name, argv, slot.speed, self.sc.compute_ms)
        self.relays[name] = Relay(name, slot, slot.stage)

    def _wait_serving(self, names: list[str], timeout: float) -> None:
        def ready() -> bool:
            self._learn_stages()
            return all(self.relays[n].serving for n in names)

        self.group.wait_until("the starting relays serving", ready, timeout, poll_s=0.2)

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
                match = SERVING.search(self.group.log_text(r.name))
                r.serving, r.stage = (True, int(match.group(1))) if match else (False, r.stage)
                if r.serving:
                    self.timeline.append({"t": self._now(), "node": r.name, "stage": r.stage, "delta": 1})

    def _now(self) -> float:
        """Wall seconds after the first iteration started (0 before it)."""
        return round(max(0.0, time.time() - self.t0), 3) if self.t0 is not None else 0.0

    def _do_crash(self, ev: Event, join: list[str]) -> dict:
        by_stage = self._serving()
        if ev.node is not None:
            victims = [ev.node] if ev.node in self.relays and self.relays[ev.node].alive else []
        else:
            candidates = [n for k, ns in by_stage.items() if ev.stage in (None, k) for n in ns]
            victims = [n for n in sorted(candidates)
                       if len(by_stage[self.relays[n].stage or 0]) > self.sc.churn.min_per_stage]  # fmt: skip
            victims = [victim_draw(self.sc, ev).choice(victims)] if victims else []
        if not victims:
            return {"skipped": "no eligible live relay (min_per_stage protects the last replicas)"}
        return self._kill(victims, ev)

    def _do_stage_loss(self, ev: Event, join: list[str]) -> dict:
        by_stage = self._serving()
        stage = ev.stage or victim_draw(self.sc, ev).randint(1, self.sc.stages)
        if not by_stage[stage]:
            return {"skipped": f"stage {stage} has no serving relay"}
        return self._kill(sorted(by_stage[stage]), ev)

    def _kill(self, victims: list[str], ev: Event) -> dict:
        for name in victims:
            self.group.kill(name)
            self.relays[name].alive = False
            if self.relays[name].serving:  # the plots count it gone now, not when its DHT record expires
                self.timeline.append({"t": self._now(), "node": name, "stage": self.relays[name].stage, "delta": -1})
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
            t0 = self.t0 = self._wait_first_iteration()
            done = self._monitor(t0, join)
        except UserError as exc:  # this variant failed (a node exited early...): a result, the others still run
            print(f"  !! {exc}", flush=True)
        finally:
            self.group.stop_all()
        leftover = self.group.leftovers()
        rows = [self._rows(r, t0) for r in range(self.sc.data_nodes)]
        redundancy = None
        if self.recovery == "redundant":  # its shadows' cost, which the relays log
            redundancy = redundancy_cost([self.log_dir / f"{name}.log" for name in self.relays])
        return RunResult(
            variant=self.variant, scenario=self.sc.name, rows=rows[0], other_rows=rows[1:],
            events=self.done_events, t0=t0, wall_s=time.time() - t_start, done=done, failed=self.group.failed(),
            leftover_pids=leftover, tokens_per_iteration=tokens_per_iteration(self.sc), log_dir=str(self.log_dir),
            redundancy=redundancy, timeline=self.timeline,
        )  # fmt: skip

    def _wait_first_iteration(self) -> float:
        self.group.wait_until("the first iteration", lambda: iterations(self._metrics(0)), 180, poll_s=0.2)
        first = iterations(self._metrics(0))[0]
        return first["time"] - first["seconds"]

    def _monitor(self, t0: float, join: list[str]) -> bool:
        shown, deadline = 0, time.monotonic() + self.sc.timeout_s
        while time.monotonic() < deadline:
            self.fire_due(time.time() - t0, join)
            self._learn_stages()  # joiners that started serving, when they did
            rows = iterations(self._metrics(0))
            for row in rows[shown:]:
                self._progress(row, t0)
            shown = len(rows)
            if all(is_done(self._metrics(r)) for r in range(self.sc.data_nodes)):
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
        return [{**r, "t": r["time"] - t0} for r in iterations(self._metrics(rank))]


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
