"""Rebuilding a pipeline stage that lost every replica: CheckFree, CheckFree+ and the baselines, one interface.

A strategy gets the lost stage's index, the live relay stages' modules (at least its neighbours k-1 and k+1 where
they exist), their last gradient norms, the model config and a seed, and returns a `RebuiltStage`: the new
weights, whether the optimizer starts fresh, and a learning-rate scale for the rebuilt stage.

    strategy = make_strategy("checkfree")
    strategy.check(cfg)                                          # UserError where it cannot apply
    rebuilt = strategy.rebuild(3, {2: stage2, 4: stage4}, {2: 0.8, 4: 1.3}, cfg, seed=7)
    opt = install(rebuilt, stage3_module, opt, lambda m: make_optimizer(m, optim_cfg))

Strategies (section 7 of the design):
    checkfree    W_k = (a W_{k-1} + b W_{k+1}) / (a + b), a and b the neighbours' last gradient norms (the less
                 converged neighbour weighs more); fresh optimizer, lr x 1.2 decaying back to 1x. The first and
                 last relay stages have one relay neighbour: they copy it.
    checkfree+   trains with out-of-order pipelining (`swap_order`): on every odd microbatch stages 1,2 and
                 S-1,S run swapped, so a lost edge stage is rebuilt by copying its swap partner; middle stages as
                 checkfree.
    copy         copy the nearest live neighbour (fresh optimizer).
    random       a fresh initialisation with a new seed (fresh optimizer).
    checkpoint   a `CheckpointStore` keeps every stage (weights + optimizer) every K iterations; a loss rolls the
                 whole model back to the last complete checkpoint (`rollback`).
    redundant    Bamboo-style: the node before stage k also holds stage k and runs its forward redundantly, so it
                 takes over exactly (weights + optimizer); costs `extra_forward_fraction` more compute per iteration.

Choices measured with `python -m gwtf.benchmarks.recovery --steps 200 --failures-at 80,140 --failure-rate 0
--strategies checkfree --target-loss 3.0882 [--weighting W] [--lr-boost X --lr-boost-decay D]` (debug preset, 6
relay stages of one layer, seed 0, middle stages lost at steps 80 and 140; final val loss at step 200):
    weighting    norm 3.0590 < squared 3.0608 (both with 1.1x decaying over 50 steps): plain norms, the default.
    lr boost     1.0x 3.0550, 1.1x->1x over 50 steps 3.0590, 1.2x->1x over 50 steps 3.0456: 1.2x decaying, the
                 default. One seed and two failures: the differences are small (< 0.015 nats).
On this tiny model (one layer per stage, a few hundred steps) a random re-init, which is close to the identity on
the residual stream (i.e. to skipping the layer), recovers as well as or better than the CheckFree average; CheckFree
beats copying a neighbour. The paper's ordering against random is a claim about larger, longer-trained models.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gwtf.data import hash_seed
from gwtf.errors import UserError
from gwtf.models.presets import ModelConfig, require_equal_stages

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]


@dataclass
class RebuiltStage:
    """What a strategy hands to the node that takes over a lost stage."""

    state_dict: StateDict
    lr_scale: float = 1.0  # the rebuilt stage's learning rate is the schedule's times this ...
    fresh_optimizer: bool = True
    lr_decay_steps: int = 0  # ... decaying linearly back to 1x over this many steps (0: it stays)
    optimizer_state: dict[str, Any] | None = None  # an exact takeover (redundant, checkpoint) keeps the moments
    source: str = ""  # how it was built, for logs and reports ("mean(2,4)", "copy(5)", "random", ...)
    transfer_stages: float = 0.0  # stage weight sets sent over the network to build it (modelled cost)

    def lr_scale_at(self, steps_since: int) -> float:
        """The learning-rate scale `steps_since` optimizer steps after the rebuild."""
        if self.lr_decay_steps <= 0:
            return self.lr_scale
        remaining = max(0.0, 1.0 - steps_since / self.lr_decay_steps)
        return 1.0 + (self.lr_scale - 1.0) * remaining


class RecoveryError(Exception):
    """A stage cannot be rebuilt by this strategy with what is still alive (e.g. every relay stage is lost)."""


class RecoveryStrategy(ABC):
    """How a stage that lost all its replicas is rebuilt."""

    name: str = ""
    extra_forward_fraction: float = 0.0  # extra compute per iteration, as a fraction of one iteration's compute

    def check(self, cfg: ModelConfig) -> None:
        """UserError if this strategy cannot apply to `cfg` (e.g. averaging unequal stages)."""
        return None

    def stage_order(self, n_stages: int, microbatch_index: int) -> list[int]:
        """The relay stage order for a microbatch: 1..S, except where a strategy trains out of order."""
        return list(range(1, n_stages + 1))

    def after_step(self, step: int, modules: Mapping[int, nn.Module], optimizers: Mapping[int, Any]) -> None:
        """Called after every optimizer step with `step` steps done, and once with 0 before training
        (checkpoint saves, redundant shadows)."""
        return None

    def rollback(self, modules: Mapping[int, nn.Module], optimizers: Mapping[int, Any]) -> int | None:
        """After the lost stages are installed: the step to resume from if every stage was rolled back
        (checkpoint), None where only the lost stages changed."""
        return None

    @abstractmethod
    def rebuild(
        self,
        lost: int,
        stages: Mapping[int, nn.Module],
        grad_norms: Mapping[int, float],
        cfg: ModelConfig,
        seed: int,
    ) -> RebuiltStage:
        """New state for relay stage `lost` from the live relay stages' modules `stages`."""


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _state(module: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def live_neighbours(lost: int, live: Mapping[int, nn.Module], n_stages: int) -> tuple[int | None, int | None]:
    """The nearest live relay stages before and after `lost` (None where there is none; stage 0 never counts)."""
    before = [k for k in live if 1 <= k < lost]
    after = [k for k in live if lost < k <= n_stages]
    return (max(before) if before else None), (min(after) if after else None)


def weighted_average(a_state: StateDict, b_state: StateDict, a: float, b: float) -> StateDict:
    """(a * A + b * B) / (a + b), parameter by parameter; equal weights (or both zero) give the plain mean."""
    if a_state.keys() != b_state.keys():
        raise RecoveryError("neighbour stages have different parameter names: they cannot be averaged")
    if not (a + b > 0):  # no gradient information (or NaN): fall back to the plain mean
        a = b = 1.0
    wa, wb = a / (a + b), b / (a + b)
    return {n: wa * a_state[n] + wb * b_state[n] for n in a_state}


def install(
    rebuilt: RebuiltStage,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
) -> torch.optim.Optimizer:
    """Load `rebuilt` into `module`; return the optimizer to use from now on (fresh, or with the kept state)."""
    module.load_state_dict(rebuilt.state_dict, strict=True)
    module.zero_grad(set_to_none=True)
    if rebuilt.fresh_optimizer or rebuilt.optimizer_state is None:
        return make_optimizer(module)
    fresh = make_optimizer(module)
    fresh.load_state_dict(copy.deepcopy(rebuilt.optimizer_state))
    return fresh


# ---------------------------------------------------------------------------------------------------------------
# CheckFree and CheckFree+


WEIGHTINGS = ("norm", "squared")


@dataclass
class CheckFree(RecoveryStrategy):
    """Average of the two neighbours weighted by their last gradient norms.

    `weighting`: "norm" weighs a neighbour by ||g||, "squared" by ||g||^2 (sharper: the less converged neighbour
    dominates). "norm" measured slightly better (module docstring) and is the default.
    `lr_scale`/`lr_decay_steps`: the rebuilt stage's learning-rate boost, decaying back linearly.
    """

    weighting: str = "norm"
    lr_scale: float = 1.2
    lr_decay_steps: int = 50
    name: str = "checkfree"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"checkfree weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if not 0.5 <= self.lr_scale <= 3.0 or self.lr_decay_steps < 0:
            raise UserError(f"checkfree lr_scale must be in [0.5, 3] and lr_decay_steps >= 0, got {self.lr_scale}")

    def check(self, cfg: ModelConfig) -> None:
        require_equal_stages(cfg)
        if cfg.n_stages < 2:
            raise UserError(f"{self.name} needs at least 2 relay stages to rebuild one from a neighbour")

    def weight(self, grad_norm: float) -> float:
        return grad_norm**2 if self.weighting == "squared" else grad_norm

    def rebuild(
        self,
        lost: int,
        stages: Mapping[int, nn.Module],
        grad_norms: Mapping[int, float],
        cfg: ModelConfig,
        seed: int,
    ) -> RebuiltStage:
        before, after = live_neighbours(lost, stages, cfg.n_stages)
        if before is None or after is None:  # an edge stage (or a gap to the edge): one relay neighbour only
            return self._copy(lost, stages, before if after is None else after)
        a, b = self.weight(grad_norms.get(before, 1.0)), self.weight(grad_norms.get(after, 1.0))
        state = weighted_average(_state(stages[before]), _state(stages[after]), a, b)
        log.info("checkfree: stage %d = (%.3g * stage %d + %.3g * stage %d) / sum", lost, a, before, b, after)
        return self._result(state, f"mean({before},{after})", transfer_stages=2.0)

    def _copy(self, lost: int, stages: Mapping[int, nn.Module], source: int | None) -> RebuiltStage:
        if source is None:
            raise RecoveryError(f"stage {lost} has no live relay stage to rebuild from")
        return self._result(_state(stages[source]), f"copy({source})", transfer_stages=1.0)

    def _result(self, state: StateDict, source: str, transfer_stages: float) -> RebuiltStage:
        return RebuiltStage(state, self.lr_scale, True, self.lr_decay_steps, None, source, transfer_stages)


def swap_order(n_stages: int, microbatch_index: int) -> list[int]:
    """CheckFree+ relay order: identity on even microbatches; on odd ones 1<->2 and S-1<->S are swapped."""
    order = list(range(1, n_stages + 1))
    if microbatch_index % 2 == 1:
        order[0], order[1] = order[1], order[0]
        order[-2], order[-1] = order[-1], order[-2]
    return order


def swap_partner(stage: int, n_stages: int) -> int | None:
    """The stage an edge stage swaps with under CheckFree+ (None for a middle stage)."""
    return {1: 2, 2: 1, n_stages - 1: n_stages, n_stages: n_stages - 1}.get(stage) if n_stages >= 4 else None


@dataclass
class CheckFreePlus(CheckFree):
    """CheckFree with out-of-order pipelining: edge stages are rebuilt by copying their swap partner."""

    name: str = "checkfree+"

    def check(self, cfg: ModelConfig) -> None:
        require_equal_stages(cfg)
        if cfg.n_stages < 4:  # with fewer, the swapped pairs (1,2) and (S-1,S) overlap
            raise UserError(f"checkfree+ needs at least 4 relay stages, the model has {cfg.n_stages}; use checkfree")

    def stage_order(self, n_stages: int, microbatch_index: int) -> list[int]:
        return swap_order(n_stages, microbatch_index)

    def rebuild(
        self,
        lost: int,
        stages: Mapping[int, nn.Module],
        grad_norms: Mapping[int, float],
        cfg: ModelConfig,
        seed: int,
    ) -> RebuiltStage:
        if lost in (1, cfg.n_stages):
            partner = swap_partner(lost, cfg.n_stages)
            if partner is not None and partner in stages:
                return self._copy(lost, stages, partner)
        return super().rebuild(lost, stages, grad_norms, cfg, seed)


# ---------------------------------------------------------------------------------------------------------------
# baselines: copy, random


@dataclass
class CopyNeighbour(RecoveryStrategy):
    """Copy the nearest live relay stage before the lost one (after it for stage 1); fresh optimizer."""

    name: str = "copy"

    def check(self, cfg: ModelConfig) -> None:
        require_equal_stages(cfg)
        if cfg.n_stages < 2:
            raise UserError("copy needs at least 2 relay stages")

    def rebuild(
        self,
        lost: int,
        stages: Mapping[int, nn.Module],
        grad_norms: Mapping[int, float],
        cfg: ModelConfig,
        seed: int,
    ) -> RebuiltStage:
        before, after = live_neighbours(lost, stages, cfg.n_stages)
        source = before if before is not None else after
        if source is None:
            raise RecoveryError(f"stage {lost} has no live relay stage to copy")
        return RebuiltStage(_state(stages[source]), source=f"copy({source})", transfer_stages=1.0)


@dataclass
class RandomInit(RecoveryStrategy):
    """A fresh initialisation of the lost stage from a new seed; fresh optimizer. Works on unequal stages too."""

    name: str = "random"

    def rebuild(
        self,
        lost: int,
        stages: Mapping[int, nn.Module],
        grad_norms: Mapping[int, float],
        cfg: ModelConfig,
        seed: int,
    ) -> RebuiltStage:
        from gwtf.models.staged import build_stage  # transformers is heavy: only when a stage is actually rebuilt

        return RebuiltStage(_state(build_stage(cfg, lost, seed)), source=f"random(seed={seed})")


# ---------------------------------------------------------------------------------------------------------------
# baseline: checkpoint and rollback


@dataclass
class Checkpoint:
    """Every stage's weights and optimizer state after `step` optimizer steps."""

    step: int
    modules: dict[int, StateDict]
    optimizers: dict[int, dict[str, Any]]


class CheckpointStore:
    """A storage peer: every `every` steps each stage sends it its weights and optimizer state.

    A checkpoint is complete when every stage of the model has sent its state for the same step; a loss rolls the
    whole model back to the last complete one (a half-written newer one is useless: the stages would disagree).
    """

    def __init__(self, every: int, stage_ids: list[int]) -> None:
        if every < 1:
            raise UserError(f"checkpoint interval must be >= 1 iteration, got {every}")
        self.every = every
        self.stage_ids = sorted(stage_ids)
        self.saves = 0  # complete checkpoints written
        self._pending: Checkpoint | None = None
        self._complete: Checkpoint | None = None

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save_stage(self, step: int, k: int, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Stage k's upload for `step`; the checkpoint becomes complete when the last stage's arrives."""
        if self._pending is None or self._pending.step != step:
            self._pending = Checkpoint(step, {}, {})
        self._pending.modules[k] = _state(module)
        self._pending.optimizers[k] = copy.deepcopy(optimizer.state_dict())
        if sorted(self._pending.modules) == self.stage_ids:
            self._complete, self._pending = self._pending, None
            self.saves += 1

    def save(self, step: int, modules: Mapping[int, nn.Module], optimizers: Mapping[int, Any]) -> None:
        for k in self.stage_ids:
            self.save_stage(step, k, modules[k], optimizers[k])

    def latest(self) -> Checkpoint | None:
        """The last complete checkpoint."""
        return self._complete

    def rollback(self, modules: Mapping[int, nn.Module], optimizers: Mapping[int, Any]) -> int:
        """Restore every stage's weights and optimizer state in place; return the step to resume from."""
        ckpt = self._complete
        if ckpt is None:
            raise RecoveryError("no complete checkpoint to roll back to; save one before training starts")
        for k in self.stage_ids:
            modules[k].load_state_dict(ckpt.modules[k], strict=True)
            modules[k].zero_grad(set_to_none=True)
            optimizers[k].load_state_dict(copy.deepcopy(ckpt.optimizers[k]))
        return ckpt.step


class CheckpointRecovery(RecoveryStrategy):
    """Periodic checkpoints of every stage (stage 0 included); a loss rolls the whole model back.

    `after_step` saves every `every` steps (call it once with step 0 before training: the first checkpoint);
    `rebuild` gives the lost stage its checkpointed state, and `rollback` then restores every other stage too.
    """

    name = "checkpoint"

    def __init__(self, every: int = 50) -> None:
        self.every = every
        self.store: CheckpointStore | None = None

    def after_step(self, step: int, modules: Mapping[int, nn.Module], optimizers: Mapping[int, Any]) -> None:
        if self.store is None:
            self.store = CheckpointStore(self.every, list(modules))
        if self.store.due(step):
            self.store.save(step, modules, optimizers)

    def rebuild(
        self,
        lost: int,
        stages: Mapping[int, nn.Module],
        grad_norms: Mapping[int, float],
        cfg: ModelConfig,
        seed: int,
    ) -> RebuiltStage:
        ckpt = self.store.latest() if self.store is not None else None
        if ckpt is None:
            raise RecoveryError("no complete checkpoint yet: call after_step(0, ...) before training")
        state = {n: t.clone() for n, t in ckpt.modules[lost].items()}
        # weights + two Adam moments come from the storage peer
        return RebuiltStage(state, 1.0, False, 0, copy.deepcopy(ckpt.optimizers[lost]), f"checkpoint@{ckpt.step}",
                            transfer_stages=3.0)  # fmt: skip

    def rollback(self, modules: Mapping[int, nn.Module], optimizers: Mapping[int, Any]) -> int | None:
        if self.store is None:
            raise RecoveryError("no checkpoint store: call after_step(0, ...) before training")
        return self.store.rollback(modules, optimizers)


# ---------------------------------------------------------------------------------------------------------------
# baseline: redundant computation (Bamboo)


class RedundantRecovery(RecoveryStrategy):
    """Each stage k is shadowed by the node of stage k-1 (stage 1 by the data nodes, which hold stage 0).

    The shadow runs stage k's forward on every microbatch (that is the extra compute: one more stage forward per
    stage, about a third of a stage's forward + backward) and keeps its weights and optimizer state in step, so a
    lost stage is taken over exactly. If the shadow's holder is lost at the same time, the shadow is gone too:
    the stage falls back to copying a neighbour (logged, and named in `RebuiltStage.source`).
    """

    name = "redundant"

    def __init__(self, extra_forward_fraction: float = 1.0 / 3.0) -> None:
        if not 0.0 <= extra_forward_fraction <= 2.0:
            raise UserError(f"redundant extra forward fraction must be in [0, 2], got {extra_forward_fraction}")
        self.extra_forward_fraction = extra_forward_fraction
        self.shadows: dict[int, tuple[StateDict, dict[str, Any]]] = {}

    def after_step(self, step: int, modules: Mapping[int, nn.Module], optimizers: Mapping[int, Any]) -> None:
        # In a deployment the shadow computes its own update; in one process copying the result is the same state.
        for k, module in modules.items():
            if k >= 1:
                self.shadows[k] = (_state(module), copy.deepcopy(optimizers[k].state_dict()))

    def rebuild(
        self,
        lost: int,
        stages: Mapping[int, nn.Module],
        grad_norms: Mapping[int, float],
        cfg: ModelConfig,
        seed: int,
    ) -> RebuiltStage:
        holder = lost - 1
        if lost in self.shadows and (holder == 0 or holder in stages):
            state, opt_state = self.shadows[lost]
            return RebuiltStage({n: t.clone() for n, t in state.items()}, 1.0, False, 0, copy.deepcopy(opt_state),
                                f"shadow@{holder}")  # fmt: skip
        log.warning("redundant: the shadow of stage %d died with stage %d; copying a neighbour", lost, holder)
        fallback = CopyNeighbour().rebuild(lost, stages, grad_norms, cfg, seed)
        fallback.source += " (shadow lost)"
        return fallback


# ---------------------------------------------------------------------------------------------------------------
# the registry


STRATEGIES: dict[str, Callable[..., RecoveryStrategy]] = {
    "checkfree": CheckFree,
    "checkfree+": CheckFreePlus,
    "copy": CopyNeighbour,
    "random": RandomInit,
    "checkpoint": CheckpointRecovery,
    "redundant": RedundantRecovery,
}


def make_strategy(name: str, **options: Any) -> RecoveryStrategy:
    """A strategy by name, with its constructor's options (e.g. checkpoint every=50, checkfree lr_scale=1.2)."""
    if name not in STRATEGIES:
        raise UserError(f"unknown recovery strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    try:
        return STRATEGIES[name](**options)
    except TypeError as exc:
        raise UserError(f"bad options {sorted(options)} for recovery strategy {name!r}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------
# failures


def iteration_failure_probability(rate_per_hour: float, iter_time_s: float) -> float:
    """p_iter = 1 - (1 - h) ** (t_iter / 3600): a stage's chance to fail within one iteration."""
    return 1.0 - (1.0 - rate_per_hour) ** (iter_time_s / 3600.0)


@dataclass
class FailureSchedule:
    """Which relay stages lose every replica at which iteration; seeded, the same for every strategy.

    `rate_per_hour` is h as a fraction (0.10 = 10 %/h) per stage per modelled hour; each stage fails
    independently at each iteration with p_iter. `explicit` adds failures at chosen iterations
    ({iteration: [stages]}) on top, to make short runs informative. Stage 0 lives on every data node: never lost.
    """

    n_stages: int
    rate_per_hour: float = 0.0
    iter_time_s: float = 60.0
    seed: int = 0
    explicit: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate_per_hour < 1.0:
            raise UserError(f"failure rate must be in [0, 1) per hour (0.10 = 10 %/h), got {self.rate_per_hour}")
        if self.iter_time_s <= 0 or self.n_stages < 1:
            raise UserError("iteration time must be positive and there must be at least one relay stage")
        bad = [k for ks in self.explicit.values() for k in ks if not 1 <= k <= self.n_stages]
        if bad:
            raise UserError(f"failure stages {bad} outside the relay stages 1..{self.n_stages}")

    @property
    def p_iter(self) -> float:
        return iteration_failure_probability(self.rate_per_hour, self.iter_time_s)

    def lost_at(self, iteration: int) -> list[int]:
        """Relay stages that lose every replica during `iteration` (sorted; independent of query order)."""
        lost = set(self.explicit.get(iteration, []))
        if self.p_iter > 0:
            gen = torch.Generator().manual_seed(hash_seed(self.seed, iteration))
            draws = torch.rand(self.n_stages, generator=gen, dtype=torch.float64)
            lost.update(k + 1 for k in range(self.n_stages) if float(draws[k]) < self.p_iter)
        return sorted(lost)

    def events(self, n_iterations: int) -> list[tuple[int, list[int]]]:
        return [(i, lost) for i in range(n_iterations) if (lost := self.lost_at(i))]

    @staticmethod
    def parse_explicit(spec: str, n_stages: int, seed: int = 0) -> dict[int, list[int]]:
        """ "100,200:3,250:1+6" -> {100: [seeded stage], 200: [3], 250: [1, 6]}; a bare iteration loses one
        middle stage drawn with the seed (middle: the case every strategy can handle; name edges explicitly)."""
        out: dict[int, list[int]] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            it_text, _, stage_text = item.partition(":")
            try:
                iteration = int(it_text)
                stages = [int(s) for s in stage_text.split("+")] if stage_text else []
            except ValueError as exc:
                raise UserError(f"bad failure {item!r}; use ITER or ITER:STAGE or ITER:STAGE+STAGE") from exc
            if not stages:
                middle = list(range(2, n_stages)) or list(range(1, n_stages + 1))
                gen = torch.Generator().manual_seed(hash_seed(seed, iteration, 7))
                stages = [middle[int(torch.randint(len(middle), (1,), generator=gen))]]
            out.setdefault(iteration, []).extend(stages)
        return out
