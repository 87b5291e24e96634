"""The run's recovery settings (`[recovery]` in a run config; `--set recovery.strategy=checkfree+`)."""

from __future__ import annotations

from dataclasses import dataclass

from gwtf.errors import UserError
from gwtf.recovery.base import RecoveryStrategy
from gwtf.recovery.registry import STRATEGIES, make_strategy


@dataclass
class RecoveryConfig:
    strategy: str = "checkfree"  # how a stage that lost every replica is rebuilt (gwtf.recovery.registry)
    stage_timeout: float = 120.0  # seconds data nodes wait for a lost stage to be rebuilt before they give up

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            live = [name for name, cls in STRATEGIES.items() if cls.live]
            raise UserError(f"recovery.strategy={self.strategy!r} is unknown; a live swarm uses one of {live}")
        if not STRATEGIES[self.strategy].live:
            raise UserError(
                f"recovery.strategy={self.strategy!r} is not a live swarm mode (no volunteer stores checkpoints here); "
                "checkpoint restart is measured as DeepSpeed's (`python -m gwtf.benchmarks.churn ... --compare "
                "system=gwtf,deepspeed`) and simulated by `python -m gwtf.benchmarks.recovery --strategies checkpoint`"
            )
        if not self.stage_timeout > 0:
            raise UserError(f"recovery.stage_timeout={self.stage_timeout} must be positive (seconds)")

    def make(self) -> RecoveryStrategy:
        """A fresh strategy object for one node (a strategy may hold per-node state: redundant's shadows)."""
        return make_strategy(self.strategy)
