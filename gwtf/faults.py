"""The fault injector: "crash node X at iteration i during phase p", shared by tests, the demo and benchmarks.

Node code calls `await injector.hit(peer, phase, iteration)` at each phase of its work; a fault fires the first time
its node reaches its phase at or after its iteration (a replica the router left idle in that iteration crashes at its
next chance), runs the injector's crash action and raises `Crashed`, so the node stops right there. For a process
the action is SIGKILL of itself (no goodbye, no flush: the real thing); for an in-process swarm it makes the peer
vanish from the network.

    FaultInjector([Fault("relay-s2-1", iteration=3, phase="backward")], on_crash=swarm.crash)
    gwtf join ... --fault backward@3          # this process SIGKILLs itself in iteration 3's first backward
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gwtf.errors import UserError

log = logging.getLogger(__name__)

PHASES = (
    "joining",  # after announcing, before taking the stage's state
    "state_download",  # as the receiver, while fetching the state from donors
    "state_donor",  # as a donor, while serving a joiner's state request
    "forward",
    "backward",
    "routing",  # asking a data node for a new next hop after a failed send
    "waiting",  # at an iteration's end, waiting for the data nodes
    "averaging",  # in the stage's averaging round
    "optimizer_step",  # after averaging, before the step is applied
)


class Crashed(Exception):
    """Raised where an injected crash happens; the node's work stops there."""


@dataclass(frozen=True)
class Fault:
    node: str  # peer id, or "*" for whichever node reaches the phase first
    iteration: int
    phase: str

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise UserError(f"unknown fault phase {self.phase!r}; phases: {', '.join(PHASES)}")

    @classmethod
    def parse(cls, spec: str, node: str = "*") -> Fault:
        """`PHASE@ITERATION`, e.g. `backward@3`."""
        phase, sep, iteration = spec.partition("@")
        if not sep or not iteration.isdigit():
            raise UserError(f"fault {spec!r}: expected PHASE@ITERATION, e.g. backward@3")
        return cls(node, int(iteration), phase)


def sigkill_self(_peer: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class FaultInjector:
    faults: list[Fault]
    on_crash: Callable[[str], Awaitable[None] | None] = sigkill_self
    fired: list[tuple[str, Fault]] = field(default_factory=list)

    async def hit(self, peer: str, phase: str, iteration: int) -> None:
        for fault in self.faults:
            if fault.phase == phase and iteration >= fault.iteration and fault.node in ("*", peer):
                self.faults.remove(fault)
                self.fired.append((peer, fault))
                log.warning("fault injected: %s crashes during %s of iteration %d", peer[:12], phase, iteration)
                result = self.on_crash(peer)
                if inspect.isawaitable(result):
                    await result
                raise Crashed(f"{peer} crashed during {phase} of iteration {iteration}")
