"""Moves to a cheaper next hop (`AgentConfig.moves` > 0: that many per round; off by default): a microbatch on a
costly chain has a cheaper one built beside it, at a next-stage peer with room, the costliest paths first; it
switches once the new chain is complete and still cheaper (`build_beside`; without, once granted), and the old
one is given back. Measured, the chains being built hold room at tight stages that first-time microbatches need,
and throughput converged later for no better cost.

Its state: `OutSlot.move` marks an out-slot being built beside its in-slot's current one (`build_rounds` at most).
"""

from __future__ import annotations

from gwtf.routing.agent.core import AgentCore


class Moves(AgentCore):
    """Overrides the `_move` hook."""

    def _move(self) -> None:
        """A microbatch on a costly chain has a cheaper one built beside it (the costliest paths first); it
        switches once the new chain is complete and still cheaper, and the old one is given back."""
        building = {o.paired: n for n, o in self.outbound.items() if o.move}
        for key, n in building.items():
            new, slot = self.outbound[n], self.inbound.get(key)
            if slot is None or slot.out is None or slot.out not in self.outbound:
                self._release_out(n)
            elif new.held and (new.chain or not self.cfg.build_beside):
                if self._value(n, slot.label) < self._value(slot.out, slot.label) - self.cfg.margin:
                    self._release_out(slot.out)
                    slot.out, new.move = n, False
                else:
                    self._release_out(n)
            elif self.round_no - new.asked > self.cfg.build_rounds:
                self._release_out(n)
        moves = self.cfg.moves
        carried = [  # only microbatches on complete chains move: a move must not leave one without a path
            k
            for k, s in self.inbound.items()
            if (o := self._held_out(s)) is not None and s.label in o.chain and k not in building
        ]
        for key in sorted(carried, key=lambda k: -self._total(k)):
            if moves <= 0:
                return
            slot = self.inbound[key]
            assert slot.out is not None
            here = self._value(slot.out, slot.label)
            options = [
                (v, p)
                for v, p in self._options(slot.label)
                if p != self.outbound[slot.out].peer and self.next[p].heard and self.next[p].spare >= 2
            ]
            if options and options[0][0] < here - self.cfg.margin:
                self._new_out(key, options[0][1], move=True)
                moves -= 1
