"""Stage-recovery strategies under one failure schedule: loss after recovery and time to a target loss.

    python -m gwtf.benchmarks.recovery --preset debug --stages 6 --failure-rate 10 \
        --strategies checkfree,checkfree+,checkpoint,redundant,copy,random,none --steps 200 --json out.json
    python -m gwtf.benchmarks.recovery --stages 6 --failures-at 60,120:1,170:6 --steps 200     # chosen failures

Every strategy trains the same model from the same seed on the same batches in this one process (stage 0 plus
relay stages 1..S, single-process staged training with gwtf.trainer's pieces) and meets the same failures:
before iteration i the schedule may take every replica of some relay stages; the strategy rebuilds them
(checkpoint rolls the whole model back and re-does the lost steps; checkfree+ trains with `swap_order` from the
start; `none` never fails). Failures are indexed by executed iterations, so re-done iterations meet failures too.

Failure rate R is in % per stage per MODELLED hour: p_iter = 1 - (1 - R/100) ** (iter_time / 3600) with the
modelled iteration time `--iter-time` (60 s: the paper's 500M model on geo-distributed GPUs). At realistic rates a
short run sees few failures; `--failures-at ITER[:STAGE[+STAGE]],...` adds chosen ones (a bare ITER loses one
seeded middle stage) so that every strategy is compared on the same, informative events.

Time is reported two ways. Measured wall time is what this process spent training (evaluation excluded).
Modelled time is the deployment's: executed iterations x iter_time, plus
  - redundant: its extra forward per iteration (`--redundant-overhead`, 1/3: one more stage forward against a
    forward + backward of ~3 forwards; the iteration is taken as compute-bound);
  - every failure but an exact takeover (redundant): the interrupted iteration, re-run (a whole iteration);
  - state transfers at `--bandwidth-mbps`, with the byte sizes of the modelled deployment (`--modelled-preset`,
    500m, S stages, fp32): checkfree pulls two neighbours' weights, copy and checkfree+ edges one;
  - checkpoint: each save sends every stage's weights and Adam moments to one storage peer (its link is shared),
    each rollback downloads them all again, and every step since the checkpoint is re-done. Its interval defaults
    to Young's optimum sqrt(2 x save time x MTBF) for the failure rate (`--checkpoint-every N` to fix it).
The target loss is the `none` run's validation loss at 80 % of the steps (`--target-loss` to fix it). The
ratios `vs_checkpoint` and `vs_redundant` are THAT strategy's modelled time to target divided by this one's
(above 1: this one is faster).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    modelled_preset: str = "500m"
    redundant_overhead: float = 1.0 / 3.0
    target_loss: float | None = None
    target_fraction: float = 0.8
    checkfree_weighting: str = "norm"
    checkfree_lr_scale: float = 1.2
    checkfree_lr_decay: int = 50
    strategies: list[str] = field(default_factory=lambda: [*STRATEGIES, NO_FAILURES])

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES and s != NO_FAILURES]
        if unknown:
            raise UserError(f"unknown strategies {unknown}; choose from {', '.join([*STRATEGIES, NO_FAILURES])}")
        if self.steps < 1 or self.eval_every < 1 or self.bandwidth_mbps <= 0:
            raise UserError("--steps and --eval-every must be >= 1 and --bandwidth-mbps positive")


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
    iter_time_s: float
    relay_weight_bytes: float  # one relay stage's fp32 weights
    all_state_bytes: float  # every stage's weights + two Adam moments (a checkpoint)
    bandwidth_bytes_s: float

    @classmethod
    def build(cls, bench: BenchConfig) -> CostModel:
        deployed = get_preset(bench.modelled_preset, stages=bench.stages)
        relay = stage_params(deployed, 1)
        total = stage_params(deployed, 0) + relay * bench.stages
        return cls(bench.iter_time_s, 4.0 * relay, 12.0 * total, bench.bandwidth_mbps * 1e6 / 8)

    @property
    def checkpoint_s(self) -> float:
        return self.all_state_bytes / self.bandwidth_bytes_s

    def transfer_s(self, relay_stage_weights: float) -> float:
        return relay_stage_weights * self.relay_weight_bytes / self.bandwidth_bytes_s

    def young_interval(self, failure_rate_pct: float, n_stages: int) -> int:
        """Young's checkpoint interval sqrt(2 C M) in iterations, M the mean time between stage losses."""
        rate = -math.log(1 - failure_rate_pct / 100) * n_stages / 3600 if failure_rate_pct > 0 else 0.0
        if rate <= 0:
            return 50
        return max(1, round(math.sqrt(2 * self.checkpoint_s / rate) / self.iter_time_s))


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


class Bench:
    def __init__(self, bench: BenchConfig) -> None:
        self.b = bench
        run_cfg = load_config(None, [f"preset={bench.preset}", f"stages={bench.stages}", f"optim.lr={bench.lr}",
                                     f"data.max_bytes={bench.max_bytes}", f"train.seed={bench.seed}"])  # fmt: skip
        self.cfg = run_cfg.model_config()
        self.optim_cfg = run_cfg.optim
        self.data: PackedData = load_data(run_cfg.data, self.cfg.seq_len)
        self.schedule = MicrobatchSchedule(self.data.train, bench.microbatch_size, bench.microbatches, 1, bench.seed)
        explicit = FailureSchedule.parse_explicit(bench.failures_at, self.cfg.n_stages, bench.seed)
        self.failures = FailureSchedule(self.cfg.n_stages, bench.failure_rate / 100, bench.iter_time_s, bench.seed,
                                        explicit)  # fmt: skip
        self.costs = CostModel.build(bench)
        self.checkpoint_every = bench.checkpoint_every or self.costs.young_interval(bench.failure_rate, bench.stages)
        self.tokens_per_step = bench.microbatch_size * bench.microbatches * self.cfg.seq_len

    def make(self, name: str) -> RecoveryStrategy | None:
        if name == NO_FAILURES:
            return None
        options: dict[str, Any] = {}
        if name in ("checkfree", "checkfree+"):
            options = {"weighting": self.b.checkfree_weighting, "lr_scale": self.b.checkfree_lr_scale,
                       "lr_decay_steps": self.b.checkfree_lr_decay}  # fmt: skip
        elif name == "checkpoint":
            options = {"every": self.checkpoint_every}
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
        max_iterations = 5 * self.b.steps  # a checkpoint run that rolls back more than it advances gives up
        while run.step < self.b.steps and run.clock.executed < max_iterations:
            lost = self.failures.lost_at(run.clock.executed) if strategy is not None else []
            if lost:
                self.recover(run, lost)
            self.iterate(run)
        return run

    def iterate(self, run: Run) -> None:
        start = time.perf_counter()
        batch = self.schedule.global_batch(run.step)
        lr = lr_at(run.step, self.b.steps, self.optim_cfg)
        _, run.grad_norms = train_step(run.modules, run.opts, batch, lr, run.strategy,
                                       _lr_scales(run.boosts, run.step))  # fmt: skip
        run.step += 1
        clock = run.clock
        clock.executed += 1
        clock.add("iterations", self.b.iter_time_s)
        if run.strategy is not None:
            overhead = run.strategy.extra_forward_fraction
            clock.redundant += overhead
            clock.add("redundant compute", overhead * self.b.iter_time_s)
            saves = self._saves(run)
            run.strategy.after_step(run.step, run.modules, run.opts)
            clock.add("checkpoint saves", (self._saves(run) - saves) * self.costs.checkpoint_s)
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
            clock.add("interrupted iterations", self.b.iter_time_s)
        if resumed is not None:
            clock.wasted += run.step - resumed
            run.step = resumed
            run.boosts.clear()
            clock.add("rollback download", self.costs.checkpoint_s)
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
    events = bench.failures.events(5 * bench_cfg.steps)
    print(f"p_iter {bench.failures.p_iter:.5f} per stage; failures (iteration: stages) "
          f"{[(i, s) for i, s in events if i < 2 * bench_cfg.steps]}; checkpoint every {bench.checkpoint_every} "
          f"(save {bench.costs.checkpoint_s:.1f} s modelled)")  # fmt: skip
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
           "checkpoint_every": bench.checkpoint_every, "checkpoint_save_s": bench.costs.checkpoint_s,
           "failures": events, "time_used_for_ratios": "modelled", "results": results}  # fmt: skip
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(out, indent=1))
    return out


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
    p.add_argument("--modelled-preset", default=d.modelled_preset, help="byte sizes of the modelled deployment")
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
    p.add_argument("--json")
    a = p.parse_args(argv)
    cfg = BenchConfig(preset=a.preset, stages=a.stages, steps=a.steps, seed=a.seed, microbatch_size=a.microbatch_size,
                      microbatches=a.microbatches, lr=a.lr, eval_every=a.eval_every, val_batches=a.val_batches,
                      failure_rate=a.failure_rate, failures_at=a.failures_at, iter_time_s=a.iter_time,
                      checkpoint_every=a.checkpoint_every, bandwidth_mbps=a.bandwidth_mbps,
                      modelled_preset=a.modelled_preset, redundant_overhead=a.redundant_overhead,
                      target_loss=a.target_loss, checkfree_weighting=a.weighting, checkfree_lr_scale=a.lr_boost,
                      checkfree_lr_decay=a.lr_boost_decay,
                      strategies=[s.strip() for s in a.strategies.split(",") if s.strip()])  # fmt: skip
    return cfg, a.json


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    try:
        cfg, json_out = parse_args(argv)
        run_bench(cfg, json_out)
    except UserError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
