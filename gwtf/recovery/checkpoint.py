"""Checkpoint restart as a careful user runs it: every K steps each stage snapshots its own shard (weights + Adam
moments) and uploads it to storage in the background while training goes on; a checkpoint can be restored only once
every stage's upload has finished (`lag` steps later); a loss rolls the whole model back to the last such one, every
stage loading its own shard in parallel. What the saves and restores cost in time is the benchmark's cost model
(gwtf.benchmarks.recovery.CostModel); here is what state is restored.

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

    A checkpoint is complete when every stage of the model has sent its state for the same step and, with an
    asynchronous upload (`lag` > 0), `lag` more steps have run (the shards are in storage only then); a loss rolls
    the whole model back to the last complete one (a half-written newer one is useless: the stages would disagree).
    """

    def __init__(self, every: int, stage_ids: list[int], lag: int = 0) -> None:
        if every < 1 or lag < 0:
            raise UserError(f"checkpoint interval must be >= 1 iteration and its upload lag >= 0, got {every}, {lag}")
        self.every, self.lag = every, lag
        self.stage_ids = sorted(stage_ids)
        self.saves = 0  # checkpoints snapshotted by every stage (their uploads started)
        self._pending: Checkpoint | None = None
        self._uploading: list[Checkpoint] = []  # snapshotted by every stage, upload not finished yet
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
            self._uploading.append(self._pending)
            self._pending = None
            self.saves += 1
            self.advance(step)

    def advance(self, step: int) -> None:
        """`step` steps have run: the uploads started `lag` or more steps ago are in storage."""
        while self._uploading and self._uploading[0].step + self.lag <= step:
            self._complete = self._uploading.pop(0)

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
        self._uploading.clear()  # their uploads die with the run that was making them: training resumes before them
        for k in self.stage_ids:
            modules[k].load_state_dict(ckpt.modules[k], strict=True)
            modules[k].zero_grad(set_to_none=True)
            optimizers[k].load_state_dict(copy.deepcopy(ckpt.optimizers[k]))
        return ckpt.step


class CheckpointRecovery(RecoveryStrategy):
    """Periodic checkpoints of every stage (stage 0 included); a loss rolls the whole model back.

    `after_step` saves every `every` steps (call it once with step 0 before training: the first checkpoint, which
    is in storage at once: nothing to overlap it with); a checkpoint counts `lag` steps after its snapshot (its
    asynchronous upload); `rebuild` gives the lost stage its checkpointed state, and `rollback` then restores every
    other stage too.
    """

    name = "checkpoint"
    live = False

    def __init__(self, every: int = 50, lag: int = 0) -> None:
        self.every, self.lag = every, lag
        self.store: CheckpointStore | None = None

    def after_step(self, step: int, modules: Mapping[int, nn.Module], optimizers: Mapping[int, Any]) -> None:
        if self.store is None:
            self.store = CheckpointStore(self.every, list(modules), self.lag)
            self.store.save(step, modules, optimizers)
            self.store.advance(step + self.lag)  # the initial state, before training: written before it starts
            return
        self.store.advance(step)
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
