"""TransportConfig: the run's transport settings (`[transport]` in a run config); WireConfig: how tensors travel
(`[wire]`): each message kind's codec (codecs.py) and whether the direct TCP path is encrypted."""

from __future__ import annotations

from dataclasses import dataclass

from gwtf.errors import UserError

# codecs.py says what each costs and keeps
CODECS = ("none", "fp16", "bf16", "uint8", "blockwise8", "channel8", "blockwise64")


@dataclass
class TransportConfig:
    """The run's transport settings (`[transport]` in a run config)."""

    call_timeout: float = 10.0  # seconds: one call to a peer

    def __post_init__(self) -> None:
        if not self.call_timeout > 0:
            raise UserError(f"transport.call_timeout={self.call_timeout} must be positive (seconds)")


@dataclass
class WireConfig:
    """How tensors travel (`[wire]` in a run config). A codec per kind of tensor message, one of CODECS:
    activations (forward, head, recompute), gradients (backward, embed_grad, recover), averaging (avg) and state
    (a joiner's download of a stage: lossy codecs there make its replica differ from the others'). On a trained
    model's activations and gradients use blockwise64: its hidden states have outlier channels that uint8 clips and
    blockwise8's 4096-value blocks spread over every other channel, and massive tokens that set channel8's scales
    (README, "Wire compression", has the measured losses)."""

    activations: str = "none"
    gradients: str = "none"
    averaging: str = "none"
    state: str = "none"
    encrypt: bool = True  # seal the direct TCP path's frames (ChaCha20-Poly1305); libp2p streams always are

    def __post_init__(self) -> None:
        for name in ("activations", "gradients", "averaging", "state"):
            if getattr(self, name) in (None, "None"):  # `--set wire.x=none` reads as TOML's none
                setattr(self, name, "none")
            if getattr(self, name) not in CODECS:
                raise UserError(f"wire.{name}={getattr(self, name)!r}: choose one of {', '.join(CODECS)}")
