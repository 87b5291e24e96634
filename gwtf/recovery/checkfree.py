"""CheckFree (a lost stage is the gradient-norm weighted average of its neighbours) and CheckFree+ (out-of-order
pipelining, so an edge stage is rebuilt by copying its swap partner)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from gwtf.errors import UserError
from gwtf.models.presets import ModelConfig, require_equal_stages
from gwtf.recovery.base import (
    RebuiltStage,
    RecoveryError,
    RecoveryStrategy,
    StateDict,
    live_neighbours,
    state_copy,
    weighted_average,
)

log = logging.getLogger(__name__)


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
        state = weighted_average(state_copy(stages[before]), state_copy(stages[after]), a, b)
        log.info("checkfree: stage %d = (%.3g * stage %d + %.3g * stage %d) / sum", lost, a, before, b, after)
        return self._result(state, f"mean({before},{after})", transfer_stages=2.0)

    def _copy(self, lost: int, stages: Mapping[int, nn.Module], source: int | None) -> RebuiltStage:
        if source is None:
            raise RecoveryError(f"stage {lost} has no live relay stage to rebuild from")
        return self._result(state_copy(stages[source]), f"copy({source})", transfer_stages=1.0)

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
