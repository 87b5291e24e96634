"""Stage-recovery strategies under one failure schedule: loss after recovery and time to a target loss.

    python -m gwtf.benchmarks.recovery --preset debug --stages 6 --failure-rate 10 \
        --strategies checkfree,checkfree+,checkpoint,redundant,copy,random,none --steps 200 --json out.json
    python -m gwtf.benchmarks.recovery --stages 6 --failures-at 60,120:1,170:6 --steps 200     # chosen failures
    python -m gwtf.benchmarks.recovery --stages 6 --set model.n_layers=12 --set model.d_model=256 \
        --set model.d_ff=768 --iter-time 0 --failure-rate 10 --seeds 3 --json out.json  # 6 x 2 layers, width 256

Every strategy trains the same model from the same seed on the same batches in this one process (stage 0 plus
relay stages 1..S, single-process staged training with gwtf.trainer's pieces) and meets the same failures:
before iteration i the schedule may take every replica of some relay stages; the strategy rebuilds them
(checkpoint rolls the whole model back and re-does the lost steps; checkfree+ trains with `swap_order` from the
start; `none` never fails). Failures are indexed by executed iterations, so re-done iterations meet failures too.

Failure rate R is in % per stage per MODELLED hour: p_iter = 1 - (1 - R/100) ** (iter_time / 3600) with the
modelled iteration time `--iter-time` (60 s: the paper's 500M model on geo-distributed GPUs; 0: this model's own
measured seconds per iteration in this process). At realistic rates a short run sees few failures;
`--failures-at ITER[:STAGE[+STAGE]],...` adds chosen ones (a bare ITER loses one seeded middle stage) so that every
strategy is compared on the same, informative events.

Time is reported two ways. Measured wall time is what this process spent training (evaluation excluded).
Modelled time is the deployment's: executed iterations x iter_time, plus
  - redundant: its extra forward per iteration (`--redundant-overhead`, 1/3: one more stage forward against a
    forward + backward of ~3 forwards; the iteration is taken as compute-bound; 0 models Bamboo's forwards run in
    pipeline bubbles);
  - every failure but an exact takeover (redundant): the interrupted iteration, re-run (a whole iteration);
  - state transfers at `--bandwidth-mbps`, with the byte sizes of the trained model (or `--modelled-preset`'s,
    S stages, fp32): checkfree pulls two neighbours' weights, copy and checkfree+ edges one;
  - checkpoint, as a careful user runs it: every K steps each stage snapshots its own shard (weights + two Adam
    moments, fp32) to host memory (the only stall: shard / 8 GB/s) and uploads it in the background over its own
    link to storage at `--storage-mbps`; a save stalls training further only if its upload outlasts the K steps
    until the next one; a checkpoint can be restored once every shard is uploaded (ceil(upload / iter_time) steps
    after its snapshot). A loss costs `--restart-s` (fixed: processes restart and rejoin) + every stage loading its
    own shard in parallel (the largest shard's download) + every step since the checkpoint, re-done. K defaults
    to Young's optimum sqrt(2 x stall x MTBF), at least the upload's steps (`--checkpoint-every N` to fix it).
Strategies that train exactly as the failure-free run until their first failure (checkfree, copy, random: the
default stage order, no extra forward, nothing done after a step) share that part: the first to reach the
schedule's first failure keeps a copy of its whole training state (weights, Adam moments, clock, curve), and the
others start from it (`--no-shared-prefix` trains each from step 0; the results are the same, bit for bit, on CPU).

The target loss is the `none` run's validation loss at 80 % of the steps (`--target-loss` to fix it). The
ratios `vs_checkpoint` and `vs_redundant` are THAT strategy's modelled time to target divided by this one's
(above 1: this one is faster). `--seeds N` repeats everything with seeds seed..seed+N-1 (model, data order,
failures) and reports each figure's mean and 95 % t-interval.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gwtf.benchmarks.stats import fmt, mean_ci
from gwtf.config import load_config
from gwtf.data import MicrobatchSchedule, PackedData, hash_seed, load_data
from gwtf.errors import UserError
from gwtf.models.presets import ModelConfig, get_preset
from gwtf.optim import OptimConfig, lr_at, make_optimizer, set_lr
from gwtf.recovery import (
    STRATEGIES,
    FailureSchedule,
    RebuiltStage,
    RecoveryError,
    RecoveryStrategy,
    install,
    make_strategy,
)
from gwtf.trainer import evaluate

log = logging.getLogger("gwtf.benchmarks.recovery")

NO_FAILURES = "none"
HOST_COPY_BYTES_S = 8e9  # an asynchronous checkpoint's only stall: its shard's snapshot into host memory


@dataclass
class BenchConfig:
    preset: str = "debug"
    stages: int = 6
    steps: int = 200
    seed: int = 0
    microbatch_size: int = 8
    microbatches: int = 2  # per step; with checkfree+ odd ones run swapped
    lr: float = 3e-3
    eval_every: int = 10
    val_batches: int = 4
    max_bytes: int = 600_000  # corpus bytes read
    failure_rate: float = 10.0  # % per stage per modelled hour
    failures_at: str = ""
    iter_time_s: float = 60.0
    checkpoint_every: int = 0  # 0: Young's optimum for the failure rate
    bandwidth_mbps: float = 1000.0
    storage_mbps: float = 1000.0  # each stage's own link to the checkpoint storage
    restart_s: float = 30.0  # a restart from a checkpoint: processes start and rejoin (modelled seconds)
    modelled_preset: str = ""  # "": the byte sizes of the model trained here
    overrides: list[str] = field(default_factory=list)  # run settings (`model.d_model=256`)
    seeds: int = 1  # repeats with seeds seed..seed+seeds-1
    redundant_overhead: float = 1.0 / 3.0
    target_loss: float | None = None
    target_fraction: float = 0.8
    checkfree_weighting: str = "norm"
    checkfree_lr_scale: float = 1.2
    checkfree_lr_decay: int = 50
    strategies: list[str] = field(default_factory=lambda: [*STRATEGIES, NO_FAILURES])
    shared_prefix: bool = True  # strategies that train as `none` until the first failure start from one copy

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES and s != NO_FAILURES]
        if unknown:
            raise UserError(f"unknown strategies {unknown}; choose from {', '.join([*STRATEGIES, NO_FAILURES])}")
        if self.steps < 1 or self.eval_every < 1 or self.bandwidth_mbps <= 0 or self.storage_mbps <= 0:
            raise UserError("--steps and --eval-every must be >= 1, --bandwidth-mbps and --storage-mbps positive")
        if self.iter_time_s < 0 or self.restart_s < 0:
            raise UserError("--iter-time (0: measured) and --restart-s must be >= 0")


# ---------------------------------------------------------------------------------------------------------------
# the modelled deployment's costs


def stage_params(cfg: ModelConfig, k: int) -> int:
    """Parameter count of stage k, built on the meta device (no memory, no RNG)."""
    from gwtf.models.staged import BlockStage, HeadStage

    with torch.device("meta"):
        module = HeadStage(cfg) if k == 0 else BlockStage(cfg, k)
    return sum(p.numel() for p in module.parameters())


@dataclass
class CostModel:
    """The modelled deployment's costs (module docstring), from the byte sizes of the model and the links."""

    iter_time_s: float
    relay_weight_bytes: float  # one relay stage's fp32 weights
    shard_bytes: dict[int, float]  # each stage's checkpoint shard: fp32 weights + two Adam moments
    bandwidth_bytes_s: float  # between peers: state transfers
    storage_bytes_s: float  # each stage's own link to the checkpoint storage
    restart_s: float  # fixed cost of a restart from a checkpoint

    @classmethod
    def build(cls, bench: BenchConfig, trained: ModelConfig, iter_time_s: float) -> CostModel:
        deployed = get_preset(bench.modelled_preset, stages=bench.stages) if bench.modelled_preset else trained
        shards = {k: 12.0 * stage_params(deployed, k) for k in range(deployed.n_stages + 1)}
        return cls(iter_time_s, shards[1] / 3, shards, bench.bandwidth_mbps * 1e6 / 8, bench.storage_mbps * 1e6 / 8,
                   bench.restart_s)  # fmt: skip

    @property
    def upload_s(self) -> float:
        """Every stage uploads its own shard over its own link: the largest shard's time."""
        return max(self.shard_bytes.values()) / self.storage_bytes_s

    @property
    def snapshot_s(self) -> float:
        return max(self.shard_bytes.values()) / HOST_COPY_BYTES_S

    def save_stall_s(self, every: int) -> float:
        """What one asynchronous save holds training up: the snapshot, and any upload still running when the next
        save is due."""
        return self.snapshot_s + max(0.0, self.upload_s - every * self.iter_time_s)

    @property
    def upload_lag(self) -> int:
        """Steps after its snapshot until a checkpoint is in storage (and can be restored)."""
        return math.ceil(self.upload_s / self.iter_time_s) if self.iter_time_s > 0 else 0

    @property
    def restore_s(self) -> float:
        """A restart: fixed cost, then every stage loads its own shard in parallel."""
        return self.restart_s + self.upload_s

    def transfer_s(self, relay_stage_weights: float) -> float:
        return relay_stage_weights * self.relay_weight_bytes / self.bandwidth_bytes_s

    def young_interval(self, failure_rate_pct: float, n_stages: int) -> int:
        """Young's checkpoint interval sqrt(2 C M) in iterations (C the save's stall, M the mean time between stage
        losses), and at least the upload's steps (a save due while the last one uploads would queue behind it)."""
        rate = -math.log(1 - failure_rate_pct / 100) * n_stages / 3600 if failure_rate_pct > 0 else 0.0
        if rate <= 0:
            return max(50, self.upload_lag)
        young = round(math.sqrt(2 * self.save_stall_s(self.upload_lag or 1) / rate) / self.iter_time_s)
        return max(1, young, self.upload_lag)


@dataclass
class Clock:
    """Modelled seconds and compute accounting of one strategy's run."""

    modelled_s: float = 0.0
    executed: int = 0  # iterations actually run
    wasted: float = 0.0  # iterations whose work was lost (interrupted ones, steps re-done after a rollback)
    redundant: float = 0.0  # iteration-equivalents of redundant compute
    overheads: dict[str, float] = field(default_factory=dict)  # modelled seconds by cause

    def add(self, cause: str, seconds: float) -> None:
        self.modelled_s += seconds
        self.overheads[cause] = self.overheads.get(cause, 0.0) + seconds


# ---------------------------------------------------------------------------------------------------------------
# training


def trains_plainly(strategy: RecoveryStrategy | None) -> bool:
    """Whether `strategy` trains exactly as the failure-free run until its first failure: the default stage order,
    no extra forward, nothing done after a step (checkfree, copy, random; not checkfree+, checkpoint, redundant)."""
    if strategy is None:
        return True
    cls = type(strategy)
    return (cls.stage_order is RecoveryStrategy.stage_order and cls.after_step is RecoveryStrategy.after_step
            and strategy.extra_forward_fraction == 0)  # fmt: skip


def _lr_scales(boosts: dict[int, tuple[RebuiltStage, int]], step: int) -> dict[int, float]:
    return {k: rebuilt.lr_scale_at(step - at) for k, (rebuilt, at) in boosts.items()}


def train_step(
    modules: dict[int, nn.Module],
    opts: dict[int, torch.optim.Optimizer],
    batch: list[torch.Tensor],
    lr: float,
    strategy: RecoveryStrategy | None,
    lr_scales: dict[int, float],
) -> tuple[float, dict[int, float]]:
    """gwtf.trainer.train_step with the strategy's stage order, per-stage lr scales and redundant forwards."""
    head: Any = modules[0]
    n_stages = len(modules) - 1
    for k, opt in opts.items():
        set_lr(opt, lr * lr_scales.get(k, 1.0))
        opt.zero_grad(set_to_none=True)
    total = 0.0
    for i, x in enumerate(batch):
        order = strategy.stage_order(n_stages, i) if strategy else list(range(1, n_stages + 1))
        hidden = head.embed(x)  # (batch, seq, d_model)
        for k in order:
            if strategy is not None and strategy.extra_forward_fraction > 0:
                with torch.no_grad():  # the shadow of stage k, on the node before it, runs the same forward
                    modules[k](hidden.detach())
            hidden = modules[k](hidden)
        loss = head.loss(hidden, x)
        (loss / len(batch)).backward()
        total += loss.item()
    norms = {k: _grad_norm(modules[k]) for k in range(1, n_stages + 1)}
    for opt in opts.values():
        opt.step()
    return total / len(batch), norms


def _grad_norm(module: nn.Module) -> float:
    grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


@dataclass
class Run:
    """One strategy's training state."""

    name: str
    strategy: RecoveryStrategy | None
    modules: dict[int, nn.Module]
    opts: dict[int, torch.optim.Optimizer]
    optim_cfg: OptimConfig
    clock: Clock
    grad_norms: dict[int, float] = field(default_factory=dict)
    boosts: dict[int, tuple[RebuiltStage, int]] = field(default_factory=dict)
    step: int = 0
    curve: dict[int, float] = field(default_factory=dict)  # step -> val loss (latest pass over that step)
    history: list[dict[str, float]] = field(default_factory=list)  # chronological evals
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


RUN_PROGRESS = ("grad_norms", "step", "clock", "curve", "history", "wall_s")  # what a shared prefix carries


class Bench:
    def __init__(self, bench: BenchConfig) -> None:
        self.b = bench
        run_cfg = load_config(None, [f"preset={bench.preset}", f"stages={bench.stages}", f"optim.lr={bench.lr}",
                                     f"data.max_bytes={bench.max_bytes}", f"train.seed={bench.seed}",
                                     *bench.overrides])  # fmt: skip
        self.cfg = run_cfg.model_config()
        self.optim_cfg = run_cfg.optim
        self.data: PackedData = load_data(run_cfg.data, self.cfg.seq_len)
        self.schedule = MicrobatchSchedule(self.data.train, bench.microbatch_size, bench.microbatches, 1, bench.seed)
        self.iter_time_s = bench.iter_time_s or self.measure_iteration()
        explicit = FailureSchedule.parse_explicit(bench.failures_at, self.cfg.n_stages, bench.seed)
        self.failures = FailureSchedule(self.cfg.n_stages, bench.failure_rate / 100, self.iter_time_s, bench.seed,
                                        explicit)  # fmt: skip
        self.costs = CostModel.build(bench, self.cfg, self.iter_time_s)
        self.checkpoint_every = bench.checkpoint_every or self.costs.young_interval(bench.failure_rate, bench.stages)
        self.tokens_per_step = bench.microbatch_size * bench.microbatches * self.cfg.seq_len
        self.events = self.failures.events(5 * bench.steps)  # (executed iteration, stages lost), in order
        self.first_failure = self.events[0][0] if self.events else None
        self._prefix: dict[str, Any] | None = None  # the training state at the first failure (shared_prefix)

    def measure_iteration(self, warmup: int = 2, timed: int = 5) -> float:
        """This model's seconds per training iteration in this process (`--iter-time 0`): CPU time of its one
        thread (torch.set_num_threads(1)), so that other programs sharing the machine do not count."""
        from gwtf.models.staged import build_stages

        modules = dict(enumerate(build_stages(self.cfg, self.b.seed)))
        opts = {k: make_optimizer(m, self.optim_cfg) for k, m in modules.items()}
        for step in range(warmup + timed):
            if step == warmup:
                start = time.process_time()
            train_step(modules, opts, self.schedule.global_batch(step), self.b.lr, None, {})
        return (time.process_time() - start) / timed

    def make(self, name: str) -> RecoveryStrategy | None:
        if name == NO_FAILURES:
            return None
        options: dict[str, Any] = {}
        if name in ("checkfree", "checkfree+"):
            options = {"weighting": self.b.checkfree_weighting, "lr_scale": self.b.checkfree_lr_scale,
                       "lr_decay_steps": self.b.checkfree_lr_decay}  # fmt: skip
        elif name == "checkpoint":
            options = {"every": self.checkpoint_every, "lag": self.costs.upload_lag}
        elif name == "redundant":
            options = {"extra_forward_fraction": self.b.redundant_overhead}
        strategy = make_strategy(name, **options)
        strategy.check(self.cfg)
        return strategy

    def val(self, run: Run) -> float:
        stages = [run.modules[k] for k in sorted(run.modules)]
        return evaluate(stages, self.data.val, self.b.microbatch_size, self.b.val_batches)

    def run(self, name: str) -> Run:
        from gwtf.models.staged import build_stages

        torch.manual_seed(self.b.seed)
        strategy = self.make(name)
        stages = build_stages(self.cfg, self.b.seed)
        modules = dict(enumerate(stages))
        opts = {k: make_optimizer(m, self.optim_cfg) for k, m in modules.items()}
        run = Run(name, strategy, modules, opts, self.optim_cfg, Clock())
        if strategy is not None:
            strategy.after_step(0, modules, opts)
        shares = self.b.shared_prefix and self.first_failure is not None and trains_plainly(strategy)
        if shares and self._prefix is not None:
            self._restore(run, self._prefix)
        max_iterations = 5 * self.b.steps  # a checkpoint run that rolls back more than it advances gives up
        while run.step < self.b.steps and run.clock.executed < max_iterations:
            if shares and self._prefix is None and run.clock.executed == self.first_failure:
                self._prefix = self._snapshot(run)
            lost = self.failures.lost_at(run.clock.executed) if strategy is not None else []
            if lost:
                self.recover(run, lost)
            self.iterate(run)
        return run

    @staticmethod
    def _snapshot(run: Run) -> dict[str, Any]:
        return {
            "modules": {k: copy.deepcopy(m.state_dict()) for k, m in run.modules.items()},
            "opts": {k: copy.deepcopy(o.state_dict()) for k, o in run.opts.items()},
            "rng": torch.get_rng_state(),
            **copy.deepcopy({f: getattr(run, f) for f in RUN_PROGRESS}),
        }

    @staticmethod
    def _restore(run: Run, prefix: dict[str, Any]) -> None:
        for k, state in prefix["modules"].items():
            run.modules[k].load_state_dict(state)
        for k, state in prefix["opts"].items():
            run.opts[k].load_state_dict(copy.deepcopy(state))
        torch.set_rng_state(prefix["rng"])
        for f in RUN_PROGRESS:
            setattr(run, f, copy.deepcopy(prefix[f]))
        log.info("%s starts from the shared run at iteration %d", run.name, run.clock.executed)

    def iterate(self, run: Run) -> None:
        start = time.perf_counter()
        batch = self.schedule.global_batch(run.step)
        lr = lr_at(run.step, self.b.steps, self.optim_cfg)
        _, run.grad_norms = train_step(run.modules, run.opts, batch, lr, run.strategy,
                                       _lr_scales(run.boosts, run.step))  # fmt: skip
        run.step += 1
        clock = run.clock
        clock.executed += 1
        clock.add("iterations", self.iter_time_s)
        if run.strategy is not None:
            overhead = run.strategy.extra_forward_fraction
            clock.redundant += overhead
            clock.add("redundant compute", overhead * self.iter_time_s)
            saves = self._saves(run)
            run.strategy.after_step(run.step, run.modules, run.opts)
            stall = self.costs.save_stall_s(self.checkpoint_every)
            clock.add("checkpoint save stalls", (self._saves(run) - saves) * stall)
        run.wall_s += time.perf_counter() - start
        if run.step % self.b.eval_every == 0 or run.step == self.b.steps:
            val = self.val(run)
            run.curve[run.step] = val
            run.history.append({"step": run.step, "iterations": clock.executed, "modelled_s": clock.modelled_s,
                                "wall_s": run.wall_s, "val_loss": val})  # fmt: skip

    @staticmethod
    def _saves(run: Run) -> int:
        store = getattr(run.strategy, "store", None)
        return store.saves if store is not None else 0

    def recover(self, run: Run, lost: list[int]) -> None:
        assert run.strategy is not None
        before = self.val(run)
        start = time.perf_counter()
        live = {k: m for k, m in run.modules.items() if k >= 1 and k not in lost}
        rebuilt: dict[int, RebuiltStage] = {}
        for k in lost:  # all from the stages alive before the failure, never from one just rebuilt
            seed = hash_seed(self.b.seed, run.clock.executed, k)
            try:
                rebuilt[k] = run.strategy.rebuild(k, live, run.grad_norms, self.cfg, seed)
            except RecoveryError as exc:  # e.g. every relay stage lost at once: nothing to average or copy
                log.warning("%s cannot rebuild stage %d (%s); random init instead", run.name, k, exc)
                rebuilt[k] = make_strategy("random").rebuild(k, live, run.grad_norms, self.cfg, seed)
        for k, r in rebuilt.items():
            run.opts[k] = install(r, run.modules[k], run.opts[k], lambda m: make_optimizer(m, self.optim_cfg))
            run.boosts[k] = (r, run.step)
        resumed = run.strategy.rollback(run.modules, run.opts)
        self._charge(run, rebuilt, resumed)
        run.wall_s += time.perf_counter() - start
        after = self.val(run)
        run.recoveries.append({"iteration": run.clock.executed, "step": run.step, "lost": lost,
                               "sources": {k: r.source for k, r in rebuilt.items()},
                               "val_before": before, "val_after": after})  # fmt: skip
        log.info("%s: lost %s at iteration %d: val %.3f -> %.3f", run.name, lost, run.clock.executed, before, after)

    def _charge(self, run: Run, rebuilt: dict[int, RebuiltStage], resumed: int | None) -> None:
        clock = run.clock
        exact = all(r.source.startswith("shadow") for r in rebuilt.values())
        if not exact:  # the interrupted iteration's work is lost and it runs again
            clock.wasted += 1
            clock.add("interrupted iterations", self.iter_time_s)
        if resumed is not None:
            clock.wasted += run.step - resumed
            run.step = resumed
            run.boosts.clear()
            clock.add("restart and parallel shard loads", self.costs.restore_s)
        else:  # stages are rebuilt in parallel: the slowest transfer counts
            clock.add("state transfers", max(self.costs.transfer_s(r.transfer_stages) for r in rebuilt.values()))


# ---------------------------------------------------------------------------------------------------------------
# results


def time_to_target(run: Run, target: float) -> dict[str, float] | None:
    for point in run.history:
        if point["val_loss"] <= target:
            return point
    return None


def summarize(bench: Bench, runs: list[Run], target: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for run in runs:
        hit = time_to_target(run, target)
        clock = run.clock
        total_compute = clock.executed + clock.redundant
        jumps = [r["val_after"] - r["val_before"] for r in run.recoveries]
        results[run.name] = {
            "final_val_loss": run.curve.get(bench.b.steps),
            "val_curve": sorted(run.curve.items()),
            "recoveries": run.recoveries,
            "mean_val_jump_after_recovery": sum(jumps) / len(jumps) if jumps else None,
            "mean_val_after_recovery": (sum(r["val_after"] for r in run.recoveries) / len(jumps)) if jumps else None,
            "target_reached": hit is not None,
            "modelled_h_to_target": hit["modelled_s"] / 3600 if hit else None,
            "wall_s_to_target": hit["wall_s"] if hit else None,
            "iterations_to_target": hit["iterations"] if hit else None,
            "modelled_h_total": clock.modelled_s / 3600,
            "modelled_overheads_s": clock.overheads,
            "wall_s": run.wall_s,
            "executed_iterations": clock.executed,
            "tokens_per_s_measured": clock.executed * bench.tokens_per_step / max(run.wall_s, 1e-9),
            "useful_tokens_per_modelled_s": run.step * bench.tokens_per_step / max(clock.modelled_s, 1e-9),
            "lost_work_iterations": clock.wasted,
            "redundant_work_iterations": clock.redundant,
            "wasted_compute_fraction": (clock.wasted + clock.redundant) / max(total_compute, 1e-9),
        }
    for base in ("checkpoint", "redundant"):
        base_t = results.get(base, {}).get("modelled_h_to_target")
        for res in results.values():
            t = res["modelled_h_to_target"]
            res[f"vs_{base}"] = base_t / t if base_t and t else None
    return results


def _fmt(v: Any, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if v is None else format(v, spec)


def print_table(results: dict[str, Any], target: float) -> None:
    print(f"target val loss {target:.4f}; ratios = that baseline's modelled time to target / this one's")
    head = f"{'strategy':12} {'final':>7} {'after':>7} {'jump':>7} {'h->tgt':>7} {'xckpt':>6} {'xredun':>6} " \
           f"{'wall s':>7} {'tok/s':>7} {'lost':>5} {'redun':>6}"  # fmt: skip
    print(head)
    for name, r in results.items():
        print(f"{name:12} {_fmt(r['final_val_loss'], '7.4f')} {_fmt(r['mean_val_after_recovery'], '7.3f')} "
              f"{_fmt(r['mean_val_jump_after_recovery'], '7.3f')} {_fmt(r['modelled_h_to_target'], '7.2f')} "
              f"{_fmt(r['vs_checkpoint'], '6.2f')} {_fmt(r['vs_redundant'], '6.2f')} {r['wall_s']:7.1f} "
              f"{r['tokens_per_s_measured']:7.0f} {r['lost_work_iterations']:5.0f} "
              f"{r['redundant_work_iterations']:6.1f}")  # fmt: skip


def run_bench(bench_cfg: BenchConfig, json_out: str | None = None) -> dict[str, Any]:
    bench = Bench(bench_cfg)
    names = list(bench_cfg.strategies)
    if bench_cfg.target_loss is None and NO_FAILURES not in names:
        names.append(NO_FAILURES)  # the target comes from the failure-free run
    names.sort(key=lambda n: n != NO_FAILURES)
    events = bench.events
    print(f"p_iter {bench.failures.p_iter:.5f} per stage; failures (iteration: stages) "
          f"{[(i, s) for i, s in events if i < 2 * bench_cfg.steps]}; checkpoint every {bench.checkpoint_every} "
          f"(upload {bench.costs.upload_s:.2f} s, stall {bench.costs.save_stall_s(bench.checkpoint_every):.3f} s, "
          f"restore {bench.costs.restore_s:.1f} s modelled; iteration {bench.iter_time_s:.3f} s)")  # fmt: skip
    runs = []
    for name in names:
        runs.append(bench.run(name))
        print(f"  {name}: final val {runs[-1].curve.get(bench_cfg.steps)}  wall {runs[-1].wall_s:.1f} s", flush=True)
    target = bench_cfg.target_loss
    if target is None:
        none_curve = runs[0].curve
        at = max(s for s in none_curve if s <= max(bench_cfg.eval_every, bench_cfg.target_fraction * bench_cfg.steps))
        target = none_curve[at]
    results = summarize(bench, runs, target)
    print_table(results, target)
    out = {"config": asdict(bench_cfg), "target_val_loss": target, "p_iter": bench.failures.p_iter,
           "checkpoint_every": bench.checkpoint_every, "iter_time_s": bench.iter_time_s,
           "cost_model": cost_model(bench),
           "failures": events, "time_used_for_ratios": "modelled", "results": results}  # fmt: skip
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(out, indent=1))
    return out


def run_seeds(cfg: BenchConfig, json_out: str | None = None) -> dict[str, Any]:
    """`--seeds N`: the benchmark N times (model, data order and failures seeded each time), one JSON."""
    if cfg.seeds <= 1:
        return run_bench(cfg, json_out)
    outs = []
    for k in range(cfg.seeds):
        print(f"== seed {cfg.seed + k}", flush=True)
        outs.append(run_bench(replace(cfg, seed=cfg.seed + k, seeds=1)))
    summary = over_seeds(outs)
    print(f"\nover {cfg.seeds} seeds: mean [95 % t-interval]")
    for name, s in summary.items():
        print(f"{name:12} final {fmt(s['final_val_loss'], 4)}  h->target {fmt(s['modelled_h_to_target'], 3)}  "
              f"x checkpoint {fmt(s['vs_checkpoint'], 2)}  reached {s['reached_target']}/{cfg.seeds}")  # fmt: skip
    out = {"config": asdict(cfg), "seeds": outs, "summary": summary}
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(out, indent=1))
    return out


def cost_model(bench: Bench) -> dict[str, Any]:
    """The figures the modelled time was built from, for the report."""
    c = bench.costs
    return {
        "iter_time_s": c.iter_time_s,
        "iter_time_measured": not bench.b.iter_time_s,
        "shard_bytes": c.shard_bytes,
        "storage_mbps_per_stage": bench.b.storage_mbps,
        "bandwidth_mbps": bench.b.bandwidth_mbps,
        "checkpoint_snapshot_stall_s": c.snapshot_s,
        "checkpoint_upload_s": c.upload_s,
        "checkpoint_save_stall_s": c.save_stall_s(bench.checkpoint_every),
        "checkpoint_upload_lag_steps": c.upload_lag,
        "restart_fixed_s": c.restart_s,
        "restore_s": c.restore_s,
        "redundant_overhead": bench.b.redundant_overhead,
    }


SEED_FIGURES = ("final_val_loss", "mean_val_after_recovery", "modelled_h_to_target", "vs_checkpoint", "vs_redundant")


def over_seeds(outs: list[dict[str, Any]]) -> dict[str, Any]:
    """`--seeds N`: each strategy's figures as mean and 95 % t-interval over the seeds, and its validation loss at
    every evaluated step the same way (equal steps)."""
    names = list(outs[0]["results"])
    summary: dict[str, Any] = {}
    for name in names:
        runs = [o["results"][name] for o in outs]
        curves = [dict(r["val_curve"]) for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        summary[name] = {
            **{k: mean_ci([r[k] for r in runs]) for k in SEED_FIGURES},
            "reached_target": sum(r["target_reached"] for r in runs),
            "val_at_step": {s: mean_ci([c[s] for c in curves]) for s in steps},
        }
    return summary


# ---------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, str | None]:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--stages", type=int, default=d.stages)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--strategies", default=",".join(d.strategies), help="comma list; 'none' = no failures")
    p.add_argument("--failure-rate", type=float, default=d.failure_rate, help="%% per stage per modelled hour")
    p.add_argument("--failures-at", default="", help="extra failures: ITER[:STAGE[+STAGE]],...")
    p.add_argument("--iter-time", type=float, default=d.iter_time_s, help="modelled seconds per iteration")
    p.add_argument("--checkpoint-every", type=int, default=0, help="iterations (0: Young's optimum)")
    p.add_argument("--bandwidth-mbps", type=float, default=d.bandwidth_mbps)
    p.add_argument("--storage-mbps", type=float, default=d.storage_mbps, help="each stage's link to checkpoints")
    p.add_argument("--restart-s", type=float, default=d.restart_s, help="fixed modelled cost of a restart")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run setting: model.d_model=256")
    p.add_argument("--seeds", type=int, default=1, help="repeat with seeds seed..seed+N-1; means and 95 %% intervals")
    p.add_argument(
        "--modelled-preset", default=d.modelled_preset, help="byte sizes of another preset (default: this model)"
    )
    p.add_argument("--redundant-overhead", type=float, default=d.redundant_overhead)
    p.add_argument("--target-loss", type=float)
    p.add_argument("--microbatch-size", type=int, default=d.microbatch_size)
    p.add_argument("--microbatches", type=int, default=d.microbatches)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--val-batches", type=int, default=d.val_batches)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weighting", default=d.checkfree_weighting, help="checkfree: norm | squared")
    p.add_argument("--lr-boost", type=float, default=d.checkfree_lr_scale, help="checkfree lr scale")
    p.add_argument("--lr-boost-decay", type=int, default=d.checkfree_lr_decay, help="steps back to 1x (0: never)")
    p.add_argument("--no-shared-prefix", action="store_true", help="train every strategy from step 0")
    p.add_argument("--json")
    a = p.parse_args(argv)
    cfg = BenchConfig(preset=a.preset, stages=a.stages, steps=a.steps, seed=a.seed, microbatch_size=a.microbatch_size,
                      microbatches=a.microbatches, lr=a.lr, eval_every=a.eval_every, val_batches=a.val_batches,
                      failure_rate=a.failure_rate, failures_at=a.failures_at, iter_time_s=a.iter_time,
                      checkpoint_every=a.checkpoint_every, bandwidth_mbps=a.bandwidth_mbps,
                      storage_mbps=a.storage_mbps, restart_s=a.restart_s, overrides=a.set, seeds=a.seeds,
                      modelled_preset=a.modelled_preset, redundant_overhead=a.redundant_overhead,
                      target_loss=a.target_loss, checkfree_weighting=a.weighting, checkfree_lr_scale=a.lr_boost,
                      checkfree_lr_decay=a.lr_boost_decay, shared_prefix=not a.no_shared_prefix,
                      strategies=[s.strip() for s in a.strategies.split(",") if s.strip()])  # fmt: skip
    return cfg, a.json


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    try:
        cfg, json_out = parse_args(argv)
        run_seeds(cfg, json_out)
    except UserError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
