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

    def __post_init__(self) -> None:
        for name in ("microbatch_timeout", "iteration_timeout"):
            if not getattr(self, name) > 0:
                raise UserError(f"iteration.{name}={getattr(self, name)} must be positive (seconds)")
        if not self.floor_bandwidth_mbps > 0:
            raise UserError(f"iteration.floor_bandwidth_mbps={self.floor_bandwidth_mbps} must be positive (Mbit/s)")
        if self.max_attempts < 1:
            raise UserError(f"iteration.max_attempts={self.max_attempts} must be >= 1")
