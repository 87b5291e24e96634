"""Takeovers (`AgentConfig.takeover`; off by default, see AgentConfig for the measurements): a relay hands a costly
microbatch over to a same-stage peer with room that carries it more cheaply between the same upstream and
downstream hops (design.md: "a node with spare capacity takes over another's flow").

Rounds: t, i hands its costly microbatch A (from h's slot n, on to j) to a same-stage peer k with room that would
carry it more cheaply (`Handover`); t+1, k checks with its own figures, reserves the slot and its own slot at j
(held, j not told yet) and answers `Taken`; t+2, i tells j (a `Transfer`, handled in exchange.py: its slot is now
k's) and h (`Moved`); t+3, j re-keys, h points its slot at k and i drops A: the path is whole at the end of every
round. `Handback`: k declines (no room or no gain), or i tells k the microbatch left meanwhile.

The handlers run whatever the flag. Its tables (in AgentState): `handovers`, `adopted`, `leaving` and the counter
`takeovers`.
"""

from __future__ import annotations

from gwtf.errors import BadMessage
from gwtf.routing.agent.core import AgentCore
from gwtf.routing.agent.messages import Handback, Handover, Moved, Release, Taken, Transfer
from gwtf.routing.agent.state import EXPIRY_ROUNDS, INF, MAX_COST, InSlot, OutSlot, PeerCard


class Takeovers(AgentCore):
    """Overrides the hooks `_begin_round` (`_leave`) and `_improve` (`_hand_over`); handles `Handover`, `Taken`,
    `Handback` and `Moved`."""

    def _begin_round(self) -> None:
        self._leave()
        super()._begin_round()

    def _improve(self) -> None:
        self._hand_over()
        super()._improve()

    def _hand_over(self) -> None:
        """My costliest microbatch goes to a same-stage peer with room (from the directory: nearest the upstream
        and nearest the downstream hop) that carries it more cheaply between the same hops. One at a time."""
        self._forget(self.handovers, self.adopted)
        lookup = getattr(self._directory, "lookup", None)
        # Adjacent stages hand over in turn (a handover takes 4 rounds): the upstream of a microbatch being handed
        # over must not hand over the same slot from its side at the same time.
        window = self.round_no % 8 == 4 * (self.card.stage % 2)
        if not self.cfg.takeover or self.is_data or self.handovers or lookup is None or not window:
            return
        for key in self._costliest_first():
            slot = self.inbound[key]
            if key in self.adopted or not (self._rested(slot) if self.is_last else self._exchangeable(slot)):
                continue
            slot.offered = self.round_no
            up = key[0]
            before = slot.prefix - self.card.compute_s - self.costs.link(up, self.me)
            nxt, chain = "", {}
            if not self.is_last:
                assert slot.out is not None
                nxt, chain = self.outbound[slot.out].peer, self.outbound[slot.out].chain
            via = (nxt, chain, slot.label)
            cost = self.costs.link(up, self.me) + self.card.compute_s + self._onwards(self.me, *via)  # from `up` on
            best = None
            for near in (up, nxt or self.sink_regions[slot.label]):
                for c in lookup(self.card.stage, near, self.cfg.lookup // 2, self.rng):
                    if c.peer_id == self.me or c.stage != self.card.stage:
                        continue
                    est = self.costs.link(up, c.peer_id) + c.compute_s + self._onwards(c.peer_id, *via)
                    if est < cost - self.cfg.margin and (best is None or est < best[0]):
                        best = (est, c.peer_id)
            if best is None:
                return  # one slot looked at per round: the lookups are bounded
            self.handovers[key] = (best[1], self.round_no)
            entry = (up, key[1], slot.label, round(before, 4), slot.share, round(cost, 4), nxt)
            self.bus.send(best[1], Handover(self.me, *entry, tuple(sorted(chain.items()))))
            return

    def _onwards(self, peer: str, nxt: str, chain: dict[str, float], label: str) -> float:
        """From `peer` to the sink over next hop `nxt` and its chain (no next hop: straight home)."""
        if not nxt:
            return self.costs.link(peer, self.sink_regions[label])
        return self.costs.link(peer, nxt) + chain.get(label, INF)

    def _on_handover(self, msg: Handover, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage)
        up = self.known.get(msg.up) if isinstance(msg.up, str) else None
        nxt = self.known.get(msg.peer) if isinstance(msg.peer, str) and msg.peer else None
        if up is None or up.stage != self.card.stage - 1 or (nxt is None) != self.is_last:
            raise BadMessage("handover from or to a peer of the wrong stage")
        if nxt is not None and nxt.stage != self.card.stage + 1:
            raise BadMessage("handover to a next hop of the wrong stage")
        if not self._valid_ask(msg.slot, msg.label, msg.prefix, msg.share):
            raise BadMessage("malformed handover")
        if not (isinstance(msg.cost, float | int) and 0 <= msg.cost < MAX_COST):
            raise BadMessage("handover cost negative, NaN or huge")
        chain = self._valid_cost(msg.chain)
        key = (msg.up, msg.slot)
        here = self.card.compute_s + self.costs.link(msg.up, self.me)
        if nxt is None:
            rest = self.costs.link(self.me, self.sink_regions[msg.label])
        else:
            rest = self.costs.link(self.me, msg.peer) + chain.get(msg.label, INF)
        if key in self.inbound or self.spare <= 0 or here + rest >= msg.cost - self.cfg.margin:
            self.bus.send(msg.sender, Handback(self.me, msg.up, msg.slot))
            return
        prefix = float(msg.prefix) + here
        slot = InSlot(msg.label, prefix, share=float(msg.share), quiet_until=self.round_no + 2)
        slot.swapped = self.round_no
        self.inbound[key] = slot
        self.adopted[key] = (msg.sender, self.round_no)
        number, to_j = -1, 0.0
        if nxt is not None:
            number = self.next_no
            self.next_no += 1
            to_j = round(prefix + self.costs.link(self.me, msg.peer), 4)
            self.outbound[number] = OutSlot(
                msg.peer,
                key,
                self.round_no,
                held=True,
                chain=chain,
                sent=(msg.label, to_j),
                quiet_until=self.round_no + 2,
            )
            slot.out = number
        self.bus.send(msg.sender, Taken(self.me, msg.up, msg.slot, number, to_j))

    def _on_taken(self, msg: Taken, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage)
        if not (isinstance(msg.slot, int) and isinstance(msg.number, int) and isinstance(msg.prefix, float | int)):
            raise BadMessage("malformed taken")
        key = (msg.up, msg.slot)
        pending = self.handovers.get(key)
        slot = self.inbound.get(key)
        out = self._held_out(slot) if slot is not None else None
        if pending is None or pending[0] != msg.sender or slot is None or (not self.is_last and out is None):
            if pending is not None and pending[0] == msg.sender:
                del self.handovers[key]
            self.bus.send(msg.sender, Handback(self.me, msg.up, msg.slot))  # gone meanwhile: k drops its reservation
            return
        if out is not None:
            assert slot.out is not None
            out.quiet_until = self.round_no + 2 * EXPIRY_ROUNDS  # no more updates to j about it
            self.bus.send(
                out.peer, Transfer(self.me, self.me, slot.out, msg.sender, msg.number, slot.label, msg.prefix)
            )
        self.bus.send(msg.up, Moved(self.me, msg.slot, msg.sender))
        self.leaving.append((key, slot.out, self.round_no + 1))
        self.takeovers += 1

    def _on_handback(self, msg: Handback, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage)
        key = (msg.up, msg.slot)
        if self.handovers.get(key, ("",))[0] == msg.sender:
            del self.handovers[key]  # declined: A stays here
        elif self.adopted.get(key, ("",))[0] == msg.sender and key in self.inbound:
            del self.adopted[key]  # the microbatch left before the handover: drop the reservation quietly
            slot = self.inbound.pop(key)
            if slot.out is not None:
                self.outbound.pop(slot.out, None)

    def _on_moved(self, msg: Moved, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage + 1)
        peer = self.known.get(msg.peer) if isinstance(msg.peer, str) else None
        if peer is None or peer.stage != card.stage or not isinstance(msg.slot, int):
            raise BadMessage("moved to an unknown or wrong-stage peer")
        out = self.outbound.get(msg.slot)
        if out is None or out.peer != msg.sender or not out.held:
            self.bus.send(msg.peer, Release(self.me, (msg.slot,)))  # we gave it up meanwhile
            return
        out.peer = msg.peer  # this round the old holder drops it and the next hop re-keys it

    def _leave(self) -> None:
        """Handed-over microbatches leave (their upstream points at the new holder from this round on)."""
        due = [e for e in self.leaving if e[2] <= self.round_no]
        self.leaving = [e for e in self.leaving if e[2] > self.round_no]
        for key, n, _ in due:
            self.handovers.pop(key, None)
            slot = self.inbound.get(key)
            if slot is not None and slot.out == n:
                del self.inbound[key]
                if n is not None:
                    self.outbound.pop(n, None)
