"""TransportConfig: the run's transport settings (`[transport]` in a run config)."""

from __future__ import annotations

from dataclasses import dataclass

from gwtf.errors import UserError


@dataclass
class TransportConfig:
    """The run's transport settings (`[transport]` in a run config)."""

    call_timeout: float = 10.0  # seconds: one call to a peer

    def __post_init__(self) -> None:
        if not self.call_timeout > 0:
            raise UserError(f"transport.call_timeout={self.call_timeout} must be positive (seconds)")
