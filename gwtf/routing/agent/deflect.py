"""Deflection (`AgentConfig.deflect`, on by default): a full relay passes the requests it cannot grant to
same-stage peers with room (from the directory, spread over them), which answer the requester directly (`Deflect`,
then a `Reply` from a peer it did not ask): a turned-down microbatch moves on one round later instead of two (at
N = 1000 the last microbatches are turned down at stage after stage, and each round trip delayed the fill).

Its table (in AgentState): `_via`, the asks of this round that another relay deflected here (not deflected again).
The requester takes such a grant only for a request still pending (core.py, `_on_reply`).
"""

from __future__ import annotations

from collections import defaultdict

from gwtf.errors import BadMessage
from gwtf.routing.agent.core import AgentCore
from gwtf.routing.agent.messages import Deflect
from gwtf.routing.agent.state import MAX_BATCH, PeerCard, SlotKey


class Deflections(AgentCore):
    """Overrides the `_deflect` hook; handles `Deflect`."""

    def _deflect(self, overflow: list[tuple[str, int, str, float, float]]) -> list[SlotKey]:
        """Pass asks we cannot grant to same-stage peers with room (from the directory, nearest first), a few
        each; returns those left to reject."""
        lookup = getattr(self._directory, "lookup", None)
        peers = lookup(self.card.stage, self.me, self.cfg.lookup, self.rng) if overflow and lookup else []
        room = [c for c in peers if c.peer_id != self.me and c.stage == self.card.stage]
        batches: dict[tuple[str, str], list[tuple[int, str, float, float]]] = defaultdict(list)
        left = []
        for k, (sender, n, label, prefix, share) in enumerate(overflow):
            if not room:
                left.append((sender, n))
                continue
            batches[(room[k % len(room)].peer_id, sender)].append((n, label, prefix, share))
        for (peer, sender), slots in sorted(batches.items()):
            self.bus.send(peer, Deflect(self.me, sender, tuple(slots[:MAX_BATCH])))
        return left

    def _on_deflect(self, msg: Deflect, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage)
        origin = self.known.get(msg.origin) if isinstance(msg.origin, str) else None
        if origin is None or origin.stage != self.card.stage - 1:
            raise BadMessage("deflected request from an unknown or wrong-stage origin")
        if len(msg.slots) > max(self.card.capacity, 1) or any(
            not (isinstance(e, tuple) and len(e) == 4) for e in msg.slots
        ):
            raise BadMessage("too many or malformed deflected slots")
        for n, label, prefix, share in msg.slots:
            if self._valid_ask(n, label, prefix, share) and (msg.origin, n) not in self.inbound:
                self._asks.append((msg.origin, n, label, float(prefix), float(share)))
                self._via.add((msg.origin, n))
