"""The fault injector: "crash node X at iteration i during phase p", shared by tests, the demo and benchmarks.

Node code calls `await injector.hit(peer, phase, iteration)` at each phase of its work; a fault fires the first time
its node reaches its phase at or after its iteration (a replica the router left idle in that iteration crashes at its
next chance), runs the injector's crash action and raises `Crashed`, so the node stops right there. For a process
the action is SIGKILL of itself (no goodbye, no flush: the real thing); for an in-process swarm it makes the peer
vanish from the network.

    FaultInjector([Fault("relay-s2-1", iteration=3, phase="backward")], on_crash=swarm.crash)
    gwtf join ... --fault backward@3          # this process SIGKILLs itself in iteration 3's first backward

Message faults (`MessageFault`) act on one outgoing call of a node: drop it (the sender sees it fail, as when the
wire loses it), delay it, or corrupt it (its tensors become NaN: the receiver must refuse it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gwtf.errors import PeerError, UserError

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


MESSAGE_ACTIONS = ("drop", "delay", "corrupt")


@dataclass(frozen=True)
class MessageFault:
    node: str  # the sender's peer id, or "*"
    iteration: int  # fires on the first matching call at or after this iteration
    handler: str  # the call's handler name: forward, backward, head, embed_grad, end_iteration, ...
    action: str  # drop | delay | corrupt
    delay_s: float = 1.0

    def __post_init__(self) -> None:
        if self.action not in MESSAGE_ACTIONS:
            raise UserError(f"unknown message fault {self.action!r}; actions: {', '.join(MESSAGE_ACTIONS)}")


def sigkill_self(_peer: str) -> None:
    """The process dies as a machine would: with its own process group (its DHT and p2pd children) if it leads
    one, as it does under the launchers; else alone."""
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class FaultInjector:
    faults: list[Fault]
    on_crash: Callable[[str], Awaitable[None] | None] = sigkill_self
    fired: list[tuple[str, Fault | MessageFault]] = field(default_factory=list)
    messages: list[MessageFault] = field(default_factory=list)

    async def on_send(self, peer: str, handler: str, msg: Any) -> Any:
        """The message as it leaves `peer` for `handler`: unchanged, delayed, corrupted, or dropped (PeerError)."""
        for fault in self.messages:
            if fault.handler == handler and msg.iteration >= fault.iteration and fault.node in ("*", peer):
                self.messages.remove(fault)
                self.fired.append((peer, fault))
                log.warning("fault injected: %s's %r message %s", peer[:12], handler, fault.action)
                if fault.action == "drop":
                    raise PeerError(f"message to {handler!r} lost on the wire (injected)")
                if fault.action == "delay":
                    await asyncio.sleep(fault.delay_s)
                else:
                    msg = dataclasses.replace(msg, tensors=[torch.full_like(t, float("nan")) for t in msg.tensors])
                break
        return msg

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
