"""The iteration's settings (`[iteration]` in a run config): every wait of a microbatch or an iteration's end on a
peer is bounded by one of these."""

from __future__ import annotations

from dataclasses import dataclass

from gwtf.errors import UserError


@dataclass
class IterationConfig:
    microbatch_timeout: float = 30.0  # seconds: a microbatch's forward or backward leg, end to end
    iteration_timeout: float = 60.0  # seconds: waiting for the other data nodes at an iteration's end
    max_attempts: int = 3  # restarts of one microbatch (and re-routes of one hop)
    # Mbit/s: the slowest link the run is meant to carry; every wait on a transfer (activations, averaging, state)
    # adds its bytes at this rate to its fixed timeout (gwtf.sizing)
    floor_bandwidth_mbps: float = 50.0
    # The most of the wall time a data node's copies of stage 0 (gwtf.runtime.stage0_copy) may be on the wire: after a
    # copy that took T seconds the next one waits (1 / share - 1) * T. They share the data node's links with its
    # activations, and at real sizes a copy is bigger than a step's traffic (SmolLM2: 680 MB for its two keepers),
    # so back to back (1.0) they would take half of those links' bandwidth all the time.
    stage0_copy_share: float = 0.25

    def __post_init__(self) -> None:
        for name in ("microbatch_timeout", "iteration_timeout"):
            if not getattr(self, name) > 0:
                raise UserError(f"iteration.{name}={getattr(self, name)} must be positive (seconds)")
        if not self.floor_bandwidth_mbps > 0:
            raise UserError(f"iteration.floor_bandwidth_mbps={self.floor_bandwidth_mbps} must be positive (Mbit/s)")
        if not 0 < self.stage0_copy_share <= 1:
            raise UserError(f"iteration.stage0_copy_share={self.stage0_copy_share} must be in (0, 1] (1: back to back)")
        if self.max_attempts < 1:
            raise UserError(f"iteration.max_attempts={self.max_attempts} must be >= 1")
