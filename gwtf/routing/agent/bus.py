"""How messages travel between agents: the `Bus` an agent sends through, and the in-process bus of the simulator
(gwtf.routing.protocol) and of a live node's agent (gwtf.routing.p2p, which sends what it collects)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

from gwtf.routing.agent.messages import Message


class Bus(Protocol):
    """Delivers messages between agents: the simulator's in-process bus, or the runtime's transport."""

    def send(self, dst: str, msg: Message) -> None: ...


@dataclass
class InProcessBus:
    """Messages sent in round t are delivered in round t+1; messages to dead peers vanish."""

    inboxes: dict[str, list[Message]] = field(default_factory=lambda: defaultdict(list))
    sent: int = 0
    dead: set[str] = field(default_factory=set)

    def send(self, dst: str, msg: Message) -> None:
        self.sent += 1
        if dst not in self.dead:
            self.inboxes[dst].append(msg)

    def take(self) -> dict[str, list[Message]]:
        out, self.inboxes = self.inboxes, defaultdict(list)
        return out
