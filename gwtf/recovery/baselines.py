"""The naive baselines: copy the nearest live neighbour, or re-initialise the lost stage from a new seed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from gwtf.errors import UserError
from gwtf.models.presets import ModelConfig, require_equal_stages
from gwtf.recovery.base import RebuiltStage, RecoveryError, RecoveryStrategy, live_neighbours, state_copy


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
        return RebuiltStage(state_copy(stages[source]), source=f"copy({source})", transfer_stages=1.0)


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

        return RebuiltStage(state_copy(build_stage(cfg, lost, seed)), source=f"random(seed={seed})")
