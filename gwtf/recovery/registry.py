"""Recovery strategies by name."""

from __future__ import annotations

from typing import Any

from gwtf.errors import UserError
from gwtf.recovery.base import RecoveryStrategy
from gwtf.recovery.baselines import CopyNeighbour, RandomInit
from gwtf.recovery.checkfree import CheckFree, CheckFreePlus
from gwtf.recovery.checkpoint import CheckpointRecovery
from gwtf.recovery.redundant import RedundantRecovery

STRATEGIES: dict[str, type[RecoveryStrategy]] = {
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
