"""Checkpoint restart: every stage's state to a storage peer every K steps, the whole model rolled back on a loss.

The one-process simulation only (`live = False`): no volunteer stores checkpoints in a live swarm here; checkpoint
restart is measured live as DeepSpeed's."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gwtf.errors import UserError
from gwtf.models.presets import ModelConfig
from gwtf.recovery.base import RebuiltStage, RecoveryError, RecoveryStrategy, StateDict, state_copy


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
        self._pending.modules[k] = state_copy(module)
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
    live = False

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
