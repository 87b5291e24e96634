"""The harness's static-pipeline baseline: DeepSpeed's `deepspeed.pipe` under a scenario's crashes, restarted from
its last checkpoint as its user would have to. This is the orchestrator (in the harness process); each rank is a
process of benchmarks.harness.deepspeed_rank, started through the process launcher (gwtf.launch.processes).

    python -m gwtf.benchmarks.churn --scenario benchmarks/scenarios/geo10.toml --compare system=gwtf,deepspeed ...

The same model, stages, data order, optimizer and schedule as the gwtf run (gwtf's own stage modules, built from the
same seed; benchmarks.ds_pipeline has the layers). A static pipeline is a grid: `dp` pipelines (data parallel) of
`stages` ranks, one rank per machine. The harness builds it the way a user with the scenario's machines would: each
stage's `dp` fastest relays, `dp` the largest divisor of the step's microbatches that every stage has machines for;
the others are spares. DeepSpeed has no data node: its first rank embeds, its last computes the loss.

What is emulated, as for gwtf's relays: a rank's stage compute (`compute_ms / speed` per forward, 2x per backward,
a sleep in the rank's compute) and its links: every pipeline send carries its send time, and the receiver waits
until send time + latency + bytes / bandwidth of the two machines' regions (gwtf.transport.LinkEmulator's table);
the data-parallel gradient all-reduce waits as long as a ring all-reduce over the group's slowest link would.

Crashes follow the scenario's schedule (the same event times and victims' draw as the gwtf runs). A crash of a
machine in the grid stops the whole job (every rank SIGKILLed at once: an instant detection, which favours
DeepSpeed) and the job restarts from its last complete checkpoint (`engine.save_checkpoint` every
`checkpoint_every` steps, real files) on a spare of the lost machine's stage, or, when there is none, once a
replacement volunteer arrives. Steps done after that checkpoint are redone; their microbatches are reported as
`rolled_back`. A crash of a spare costs nothing but the spare.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gwtf.benchmarks.harness.events import Event, victim_draw
from gwtf.benchmarks.harness.results import RunResult, is_done, iterations
from gwtf.benchmarks.harness.scenario import NodeSpec, Scenario
from gwtf.benchmarks.harness.settings import run_config, tokens_per_iteration
from gwtf.errors import UserError
from gwtf.launch.processes import ProcessGroup, leftovers

METRICS = "data-0.jsonl"
RANK_ENTRY = ("-m", "gwtf.benchmarks.harness.deepspeed_rank")
RANK_ENV = {"DS_ACCELERATOR": "cpu"}


# ---------------------------------------------------------------------------------------------------------------
# placement


@dataclass
class Machine:
    name: str
    stage: int
    region: str | None
    speed: float
    alive: bool = True


@dataclass
class Grid:
    """Which machine runs each (stage, data-parallel index) rank of the current job."""

    stages: int
    dp: int
    ranks: dict[tuple[int, int], str] = field(default_factory=dict)

    def machines(self) -> set[str]:
        return set(self.ranks.values())


def choose_dp(microbatches: int, per_stage: list[int]) -> int:
    """The widest data parallelism every stage can staff that divides the step's microbatches."""
    most = min(per_stage)
    if most < 1:
        raise UserError("the DeepSpeed baseline needs at least one machine per stage")
    return max(d for d in range(1, most + 1) if microbatches % d == 0)


def initial_grid(machines: list[Machine], stages: int, dp: int) -> Grid:
    grid = Grid(stages, dp)
    for k in range(1, stages + 1):
        fastest = sorted((m for m in machines if m.stage == k), key=lambda m: (-m.speed, m.name))[:dp]
        for d, m in enumerate(fastest):
            grid.ranks[(k, d)] = m.name
    return grid


# ---------------------------------------------------------------------------------------------------------------
# the orchestrator (runs in the harness process)


class DeepSpeedRun:
    """One scenario run of the DeepSpeed baseline; `execute()` returns a RunResult like the gwtf swarm's."""

    def __init__(self, sc: Scenario, variant: dict[str, str], log_dir: Path, events: list[Event]):
        self.sc, self.variant, self.log_dir = sc, variant, log_dir
        self.pending = sorted(events, key=lambda e: e.t)
        self.machines: dict[str, Machine] = {}
        for slot in sc.nodes:
            for i in range(slot.count):
                name = f"relay-s{slot.stage}-{len(self.machines)}-{i}"  # the gwtf runs' names: the same victims
                self.machines[name] = Machine(name, slot.stage, slot.region, slot.speed)
        cfg = run_config(sc)
        self.microbatches = cfg.train.microbatches_per_step
        per_stage = [sum(1 for m in self.machines.values() if m.stage == k) for k in range(1, sc.stages + 1)]
        self.dp = choose_dp(self.microbatches, per_stage)
        self.grid = initial_grid(list(self.machines.values()), sc.stages, self.dp)
        self.every = int(getattr(sc, "checkpoint_every", 10))
        self.job: ProcessGroup | None = None  # the current attempt's ranks
        self.procs: list[subprocess.Popen] = []  # the same, as processes (empty while the job is down)
        self.pgids: set[int] = set()  # every rank's process group, all attempts: none may outlive the run
        self.attempt = 0
        self.done_events: list[dict] = []
        self.restarts: list[dict] = []
        self.waiting_for: set[int] = set()  # stages whose grid slot has no machine (job down until a joiner)
        self.joiners = 0
        shutil.rmtree(log_dir / "checkpoints", ignore_errors=True)  # a fresh run never resumes an old one's

    # ---- processes -------------------------------------------------------------------------------------------
    def _start_job(self) -> None:
        from gwtf.benchmarks.ds_pipeline import free_port

        self.attempt += 1
        port, world = free_port(), self.sc.stages * self.dp
        placement = {f"{k},{d}": self._spec(name) for (k, d), name in self.grid.ranks.items()}
        settings = {
            "preset": self.sc.preset, "stages": self.sc.stages, "dp": self.dp, "steps": self.sc.steps,
            "seed": self.sc.seed, "overrides": list(self.sc.overrides), "compute_ms": self.sc.compute_ms,
            "checkpoint_every": self.every, "checkpoint_dir": str(self.log_dir / "checkpoints"),
            "metrics": str(self.log_dir / METRICS), "placement": placement, "attempt": self.attempt,
        }  # fmt: skip
        self.job = ProcessGroup(self.log_dir, ok_exits=(0,))  # a rank SIGKILLed by anyone but the harness failed
        for rank in range(world):
            argv = ["--rank", str(rank), "--world", str(world), "--port", str(port), "--settings", json.dumps(settings)]
            self.job.start(f"ds-rank{rank}-attempt{self.attempt}", argv, entry=RANK_ENTRY, env=RANK_ENV)
        self.procs = list(self.job.procs.values())
        self.pgids |= self.job.pgids()

    def _spec(self, name: str) -> dict:
        m = self.machines[name]
        return {"name": name, "region": m.region, "speed": m.speed}

    def _kill_job(self) -> None:
        """Every rank SIGKILLed at once (with what it started), then reaped."""
        if self.job is not None:
            self.job.kill_all()
        self.job, self.procs = None, []

    def _job_failed(self) -> bool:
        return bool(self.job is not None and self.job.failed())

    # ---- events ----------------------------------------------------------------------------------------------
    def _fire_due(self, t: float) -> None:
        while self.pending and self.pending[0].t <= t:
            ev = self.pending.pop(0)
            outcome = getattr(self, f"_do_{ev.action}")(ev)
            self.done_events.append({"t": round(t, 3), "planned_t": round(ev.t, 3), "action": ev.action,
                                     "origin": ev.origin, **outcome})  # fmt: skip
            print(f"  ** {ev.action} ({ev.origin}) at {t:.1f}s: {outcome}", flush=True)

    def _live(self, stage: int | None = None) -> list[str]:
        return sorted(n for n, m in self.machines.items() if m.alive and stage in (None, m.stage))

    def _do_crash(self, ev: Event) -> dict:
        if ev.node is not None:
            victims = [ev.node] if ev.node in self.machines and self.machines[ev.node].alive else []
        else:
            candidates = [n for n in self._live() if ev.stage in (None, self.machines[n].stage)]
            victims = [n for n in candidates
                       if len(self._live(self.machines[n].stage)) > self.sc.churn.min_per_stage]  # fmt: skip
            victims = [victim_draw(self.sc, ev).choice(victims)] if victims else []
        if not victims:
            return {"skipped": "no eligible live relay (min_per_stage protects the last replicas)"}
        return self._kill(victims, ev)

    def _do_stage_loss(self, ev: Event) -> dict:
        stage = ev.stage or victim_draw(self.sc, ev).randint(1, self.sc.stages)
        if not self._live(stage):
            return {"skipped": f"stage {stage} has no live machine"}
        return self._kill(self._live(stage), ev)

    def _kill(self, victims: list[str], ev: Event) -> dict:
        hit = [v for v in victims if v in self.grid.machines()]
        for v in victims:
            self.machines[v].alive = False
            if self.sc.churn.rejoin_after_s is not None and ev.origin == "rate":
                when = ev.t + self.sc.wall(self.sc.churn.rejoin_after_s)
                m = self.machines[v]
                slot = NodeSpec(m.stage, m.region, m.speed, 1, 1)
                self.pending.append(Event(when, "join", "rejoin", index=ev.index, slot=slot))
                self.pending.sort(key=lambda e: e.t)
        outcome: dict[str, Any] = {"victims": victims, "stage": self.machines[victims[0]].stage}
        if hit:
            self._kill_job()
            outcome["job"] = f"stopped (attempt {self.attempt} lost {hit})"
            for (k, d), name in list(self.grid.ranks.items()):
                if name in hit:
                    del self.grid.ranks[(k, d)]
            self._restaff()
        return outcome

    def _do_join(self, ev: Event) -> dict:
        slot = ev.slot
        names = []
        for _ in range(slot.count if slot is not None else 1):
            stage = slot.stage if slot is not None and slot.stage is not None else self._neediest_stage()
            name = f"joiner-{self.joiners}"
            self.joiners += 1
            region, speed = (slot.region, slot.speed) if slot is not None else (None, 1.0)
            self.machines[name] = Machine(name, stage, region, speed)
            names.append(name)
        self._restaff()
        return {"joiners": names, "stage": self.machines[names[0]].stage, "region": self.machines[names[0]].region}

    def _neediest_stage(self) -> int:
        return min(range(1, self.sc.stages + 1), key=lambda k: (len(self._live(k)), k))

    def _restaff(self) -> None:
        """Fill the grid's empty ranks from idle live machines of their stage; restart the job once it is full."""
        if self.procs:
            return
        idle = [n for n in self._live() if n not in self.grid.machines()]
        for k in range(1, self.sc.stages + 1):
            for d in range(self.dp):
                if (k, d) not in self.grid.ranks:
                    spares = sorted((n for n in idle if self.machines[n].stage == k),
                                    key=lambda n: (-self.machines[n].speed, n))  # fmt: skip
                    if spares:
                        self.grid.ranks[(k, d)] = spares[0]
                        idle.remove(spares[0])
        if len(self.grid.ranks) == self.sc.stages * self.dp:
            self.restarts.append({"attempt": self.attempt + 1, "t_unix": time.time()})
            self._start_job()

    # ---- the loop ----------------------------------------------------------------------------------------------
    def execute(self) -> RunResult:
        t_start = time.time()
        metrics = self.log_dir / METRICS
        print(f"   deepspeed: {self.dp} pipeline(s) x {self.sc.stages} stages on {sorted(self.grid.machines())}, "
              f"checkpoint every {self.every} steps", flush=True)  # fmt: skip
        done = False
        t0: float | None = None
        try:
            self._start_job()
            deadline = time.monotonic() + self.sc.timeout_s + 180
            shown = 0
            while time.monotonic() < deadline:
                rows = iterations(metrics)
                if t0 is None and rows:
                    t0 = rows[0]["time"] - rows[0]["seconds"]
                if t0 is not None:
                    self._fire_due(time.time() - t0)
                for row in rows[shown:]:
                    self._progress(row, t0 or 0.0)
                shown = len(rows)
                if is_done(metrics):  # written after the last step's barrier: a later crash no longer matters
                    done = True
                    break
                if self._job_failed():
                    print(f"  !! a DeepSpeed rank failed on its own; see {self.log_dir}", flush=True)
                    break
                time.sleep(0.2)
            else:
                print(f"  !! timed out after {self.sc.timeout_s + 180:.0f}s", flush=True)
        finally:
            self._kill_job()
        rows = iterations(metrics)
        t0 = t0 if t0 is not None else t_start
        for r in self.restarts:  # when each restart began, for the report's fixed-cost scaling (harness.report)
            self.done_events.append({"t": round(r["t_unix"] - t0, 3), "action": "restart", "attempt": r["attempt"]})
        return RunResult(
            variant=self.variant, scenario=self.sc.name, rows=_mark_rollbacks(rows, t0), other_rows=[],
            events=self.done_events, t0=t0, wall_s=time.time() - t_start, done=done, failed=[],
            leftover_pids=leftovers(self.pgids), tokens_per_iteration=tokens_per_iteration(self.sc),
            log_dir=str(self.log_dir),
        )  # fmt: skip

    def _progress(self, row: dict, t0: float) -> None:
        print(f"[{self.sc.name} system=deepspeed] t={row['time'] - t0:6.1f}s step {row['iteration'] + 1:4d}/"
              f"{self.sc.steps} loss {row['loss']:.3f} {row['tokens_per_s']:7.0f} tok/s attempt {row['attempt']}",
              flush=True)  # fmt: skip


def _mark_rollbacks(rows: list[dict], t0: float) -> list[dict]:
    """Rows with `t`; a step later redone after a restart counts its microbatches as `rolled_back`, not finished."""
    out = [{**r, "t": r["time"] - t0, "rolled_back": 0} for r in rows]
    for i, row in enumerate(out):
        later = [r for r in out[i + 1 :] if r["attempt"] > row["attempt"]]
        if later and later[0]["iteration"] <= row["iteration"]:
            row["rolled_back"], row["finished"] = row["finished"], 0
    return out
