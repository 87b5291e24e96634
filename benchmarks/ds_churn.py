"""The harness's static-pipeline baseline: DeepSpeed's `deepspeed.pipe` under a scenario's crashes, restarted from
its last checkpoint as its user would have to.

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

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gwtf.errors import UserError

METRICS = "data-0.jsonl"


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
    """One scenario run of the DeepSpeed baseline; `execute()` returns a benchmarks.churn.RunResult."""

    def __init__(self, sc: Any, variant: dict[str, str], log_dir: Path, events: list[Any]):
        self.sc, self.variant, self.log_dir = sc, variant, log_dir
        self.pending = sorted(events, key=lambda e: e.t)
        self.machines: dict[str, Machine] = {}
        for slot in sc.nodes:
            for i in range(slot.count):
                name = f"relay-s{slot.stage}-{len(self.machines)}-{i}"  # the gwtf runs' names: the same victims
                self.machines[name] = Machine(name, slot.stage, slot.region, slot.speed)
        cfg = _run_config(sc)
        self.microbatches = cfg.train.microbatches_per_step
        per_stage = [sum(1 for m in self.machines.values() if m.stage == k) for k in range(1, sc.stages + 1)]
        self.dp = choose_dp(self.microbatches, per_stage)
        self.grid = initial_grid(list(self.machines.values()), sc.stages, self.dp)
        self.every = int(getattr(sc, "checkpoint_every", 10))
        self.procs: list[subprocess.Popen] = []  # the current attempt's ranks
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
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
        for rank in range(world):
            out = open(self.log_dir / f"ds-rank{rank}-attempt{self.attempt}.log", "w")  # noqa: SIM115
            argv = [sys.executable, "-m", "gwtf.benchmarks.ds_churn", "worker", "--rank", str(rank), "--world",
                    str(world), "--port", str(port), "--settings", json.dumps(settings)]  # fmt: skip
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.procs.append(proc)
            self.pgids.add(proc.pid)
            out.close()

    def _spec(self, name: str) -> dict:
        m = self.machines[name]
        return {"name": name, "region": m.region, "speed": m.speed}

    def _kill_job(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs = []

    def _job_failed(self) -> bool:
        return any(p.poll() not in (None, 0) for p in self.procs)

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

    def _do_crash(self, ev: Any) -> dict:
        if ev.node is not None:
            victims = [ev.node] if ev.node in self.machines and self.machines[ev.node].alive else []
        else:
            candidates = [n for n in self._live() if ev.stage in (None, self.machines[n].stage)]
            victims = [n for n in candidates
                       if len(self._live(self.machines[n].stage)) > self.sc.churn.min_per_stage]  # fmt: skip
            victims = [random.Random(self.sc.seed * 7919 + ev.index).choice(victims)] if victims else []
        if not victims:
            return {"skipped": "no eligible live relay (min_per_stage protects the last replicas)"}
        return self._kill(victims, ev)

    def _do_stage_loss(self, ev: Any) -> dict:
        stage = ev.stage or random.Random(self.sc.seed * 7919 + ev.index).randint(1, self.sc.stages)
        if not self._live(stage):
            return {"skipped": f"stage {stage} has no live machine"}
        return self._kill(self._live(stage), ev)

    def _kill(self, victims: list[str], ev: Any) -> dict:
        from gwtf.benchmarks.churn import Event

        hit = [v for v in victims if v in self.grid.machines()]
        for v in victims:
            self.machines[v].alive = False
            if self.sc.churn.rejoin_after_s is not None and ev.origin == "rate":
                when = ev.t + self.sc.wall(self.sc.churn.rejoin_after_s)
                m = self.machines[v]
                slot = _slot(m.stage, m.region, m.speed)
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

    def _do_join(self, ev: Any) -> dict:
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
    def execute(self) -> Any:
        from gwtf.benchmarks.churn import RunResult, _done, _iterations, _tokens_per_iteration, leftovers

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
                rows = _iterations(metrics)
                if t0 is None and rows:
                    t0 = rows[0]["time"] - rows[0]["seconds"]
                if t0 is not None:
                    self._fire_due(time.time() - t0)
                for row in rows[shown:]:
                    self._progress(row, t0 or 0.0)
                shown = len(rows)
                if _done(metrics):  # written after the last step's barrier: a later crash no longer matters
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
        rows = _iterations(metrics)
        t0 = t0 if t0 is not None else t_start
        return RunResult(
            variant=self.variant, scenario=self.sc.name, rows=_mark_rollbacks(rows, t0), other_rows=[],
            events=self.done_events, t0=t0, wall_s=time.time() - t_start, done=done, failed=[],
            leftover_pids=leftovers(self.pgids), tokens_per_iteration=_tokens_per_iteration(self.sc),
            log_dir=str(self.log_dir),
        )  # fmt: skip

    def _progress(self, row: dict, t0: float) -> None:
        print(f"[{self.sc.name} system=deepspeed] t={row['time'] - t0:6.1f}s step {row['iteration'] + 1:4d}/"
              f"{self.sc.steps} loss {row['loss']:.3f} {row['tokens_per_s']:7.0f} tok/s attempt {row['attempt']}",
              flush=True)  # fmt: skip


def _slot(stage: int, region: str | None, speed: float) -> Any:
    from gwtf.benchmarks.churn import NodeSpec

    return NodeSpec(stage, region, speed, 1, 1)


def _run_config(sc: Any) -> Any:
    from gwtf.config import load_config

    return load_config(None, [f"preset={sc.preset}", f"stages={sc.stages}", f"train.seed={sc.seed}", *sc.overrides])


def _mark_rollbacks(rows: list[dict], t0: float) -> list[dict]:
    """Rows with `t`; a step later redone after a restart counts its microbatches as `rolled_back`, not finished."""
    out = [{**r, "t": r["time"] - t0, "rolled_back": 0} for r in rows]
    for i, row in enumerate(out):
        later = [r for r in out[i + 1 :] if r["attempt"] > row["attempt"]]
        if later and later[0]["iteration"] <= row["iteration"]:
            row["rolled_back"], row["finished"] = row["finished"], 0
    return out


# ---------------------------------------------------------------------------------------------------------------
# one rank (its own process)


def _worker(rank: int, world: int, port: int, s: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    import torch

    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule

    from gwtf.benchmarks.ds_pipeline import EmbedLayer, HeadLayer, _skip_shm_build, next_token_loss
    from gwtf.config import load_config
    from gwtf.data import MicrobatchSchedule, load_data
    from gwtf.optim import lr_at, make_optimizer, set_lr

    _skip_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    stages, dp = s["stages"], s["dp"]
    cfg = load_config(None, [f"preset={s['preset']}", f"stages={stages}", f"train.seed={s['seed']}", *s["overrides"]])
    model_cfg, t = cfg.model_config(), cfg.train
    per_pipe = t.microbatches_per_step // dp
    stage_of_rank = rank // dp  # DeepSpeed's PipeDataParallelTopology: rank = stage * dp + data-parallel index
    me = s["placement"][f"{stage_of_rank + 1},{rank % dp}"]
    forward_s = s["compute_ms"] / 1000 / me["speed"]
    SlowRelay = _make_slow_relay()  # noqa: N806 (a class; built here so that importing this module stays light)
    specs = [LayerSpec(EmbedLayer, model_cfg, s["seed"])]
    specs += [LayerSpec(SlowRelay, model_cfg, k, s["seed"], forward_s) for k in range(1, model_cfg.n_stages + 1)]
    specs.append(LayerSpec(HeadLayer, model_cfg, s["seed"]))
    module = PipelineModule(layers=specs, num_stages=stages, loss_fn=next_token_loss,
                            partition_method="type:SlowRelay", activation_checkpoint_interval=0)  # fmt: skip
    optimizer = make_optimizer(module, cfg.optim)
    ds_config = {"train_micro_batch_size_per_gpu": t.microbatch_size, "gradient_accumulation_steps": per_pipe,
                 "train_batch_size": t.microbatch_size * per_pipe * dp, "steps_per_print": 1 << 30}  # fmt: skip
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    assert engine.grid.get_stage_id() == stage_of_rank and engine.grid.get_data_parallel_id() == rank % dp
    _emulate_links(engine, s, stage_of_rank, rank % dp)

    start = 0
    if (Path(s["checkpoint_dir"]) / "latest").exists():
        _, client = engine.load_checkpoint(s["checkpoint_dir"])
        start = int(client["step"]) if client else 0
    data = load_data(cfg.data, model_cfg.seq_len)
    schedule = MicrobatchSchedule(data.train, t.microbatch_size, t.microbatches_per_step, 1, s["seed"])
    writes = stage_of_rank == stages - 1 and rank % dp == 0
    tokens = t.microbatches_per_step * t.microbatch_size * model_cfg.seq_len
    for step in range(start, s["steps"]):
        began = time.time()
        set_lr(optimizer, lr_at(step, s["steps"], cfg.optim))
        mine = schedule.global_batch(step)[(rank % dp) * per_pipe : (rank % dp + 1) * per_pipe]
        loss = float(engine.train_batch(data_iter=iter([(x, x) for x in mine])))
        if (step + 1) % s["checkpoint_every"] == 0 and step + 1 < s["steps"]:
            engine.save_checkpoint(s["checkpoint_dir"], tag=f"step{step + 1}", client_state={"step": step + 1})
        if writes:
            now = time.time()
            row = {"time": now, "event": "iteration", "iteration": step, "loss": loss, "seconds": now - began,
                   "tokens_per_s": tokens / (now - began), "started": t.microbatches_per_step,
                   "finished": t.microbatches_per_step, "rerouted": 0, "partial": 0, "lost": 0,
                   "live_per_stage": [dp] * stages, "attempt": s["attempt"]}  # fmt: skip
            _append(s["metrics"], row)
    torch.distributed.barrier()
    if writes:
        _append(s["metrics"], {"time": time.time(), "event": "done"})
    torch.distributed.destroy_process_group()


def _append(path: str, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _sleep_in_backward(seconds: float) -> Any:
    import torch

    class SleepInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            return x.view_as(x)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            time.sleep(seconds)
            return grad

    return SleepInBackward.apply


def _make_slow_relay() -> type:
    from gwtf.benchmarks.ds_pipeline import RelayLayer

    class SlowRelay(RelayLayer):
        """gwtf's relay stage k with a device `speed` times the base one: sleeps as benchmarks.churn's relays do."""

        def __init__(self, model_cfg: Any, k: int, seed: int, forward_s: float) -> None:
            super().__init__(model_cfg, k, seed)
            self.forward_s = forward_s
            self.slow_backward = _sleep_in_backward(2 * forward_s)

        def forward(self, hidden: Any) -> Any:
            out = super().forward(hidden)
            if self.forward_s > 0:
                time.sleep(self.forward_s)
                out = self.slow_backward(out)
            return out

    return SlowRelay


def _emulate_links(engine: Any, s: dict, stage: int, d: int) -> None:
    """Pipeline sends carry their send time; receives wait for latency + bytes / bandwidth of the regions' link.
    The gradient all-reduce over the data-parallel group waits for a ring all-reduce on its slowest link."""
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.pipe import p2p

    from gwtf.transport import LinkEmulator

    links = LinkEmulator()
    region = {tuple(map(int, key.split(","))): spec["region"] for key, spec in s["placement"].items()}
    mine = region[(stage + 1, d)]
    send, recv = p2p.send, p2p.recv

    def timed_send(tensor: Any, dest_stage: int, async_op: bool = False) -> Any:
        dist.send(torch.tensor([time.time()], dtype=torch.float64), p2p._grid.stage_to_global(stage_id=dest_stage))
        return send(tensor, dest_stage, async_op)

    def timed_recv(tensor: Any, src_stage: int, async_op: bool = False) -> Any:
        stamp = torch.zeros(1, dtype=torch.float64)
        dist.recv(stamp, p2p._grid.stage_to_global(stage_id=src_stage))
        out = recv(tensor, src_stage, async_op)
        latency, bandwidth = links.link(region[(src_stage + 1, d)], mine)
        wait = float(stamp[0]) + latency + tensor.numel() * tensor.element_size() / bandwidth - time.time()
        if wait > 0:
            time.sleep(wait)
        return out

    p2p.send, p2p.recv = timed_send, timed_recv
    group = [region[(stage + 1, j)] for j in range(s["dp"])]
    if len(group) > 1:
        nbytes = sum(p.numel() * p.element_size() for p in engine.module.parameters())
        worst = [links.link(a, b) for i, a in enumerate(group) for j, b in enumerate(group) if i != j]
        latency, bandwidth = max(w[0] for w in worst), min(w[1] for w in worst)
        n = len(group)
        ring_s = 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / bandwidth
        original = engine.allreduce_gradients

        def slow_allreduce(*args: Any, **kwargs: Any) -> Any:
            began = time.time()
            out = original(*args, **kwargs)
            time.sleep(max(0.0, ring_s - (time.time() - began)))
            return out

        engine.allreduce_gradients = slow_allreduce


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gwtf.benchmarks.ds_churn", description="one rank of the DeepSpeed baseline")
    parser.add_argument("role", choices=["worker"])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--settings", required=True)
    args = parser.parse_args(argv)
    _worker(args.rank, args.world, args.port, json.loads(args.settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
