"""Claims (`AgentConfig.evict`, on in a live swarm: gwtf.routing.p2p): a data node that starts after another has
taken the room at stage 1 would wait for good (room is never given back). Where data nodes meet, a full stage-1
relay asked by a data node with no first hop at all asks the data node that holds the most slots there to give one
up (`Claim`); if that one keeps another first hop it yields (`Yield`), and the slot, with the chain behind it,
goes to the newcomer. A data node with no first hop and no request out asks a full relay anyway (`_starving`).

Its tables (in AgentState): `claims` (slot claimed -> (the ask it is for, round)) and the counter `claimed`.
"""

from __future__ import annotations

from collections import Counter

from gwtf.routing.agent.core import AgentCore
from gwtf.routing.agent.messages import Claim, Reply, Yield
from gwtf.routing.agent.state import PeerCard


class Claims(AgentCore):
    """Overrides the hooks `_claim_for` and `_starving` and wraps `_grant`; handles `Claim` and `Yield`."""

    def _grant(self) -> None:
        self._forget(self.claims)  # claims nobody answered
        super()._grant()

    def _claim_for(self, ask: tuple[str, int, str, float, float], claimed: list) -> bool:
        """Where data nodes meet (stage 1), with `AgentConfig.evict`: a data node with no first hop at all finds
        this relay full. Ask the data node that holds the most slots here to give one up (`Claim`); if it has
        another first hop it yields (`Yield`) and the slot, with the chain behind it, goes to the newcomer. The
        holder decides, from what it holds now, so two relays claiming at once cannot leave it without a first
        hop (no swinging back). One claim per round. Without it a data node that starts after another has taken
        the room waits for good (room is never given back)."""
        sender, n, label, prefix, share = ask
        if not self.cfg.evict or self.card.stage != 1 or share > 0 or claimed:
            return False
        if any(k[0] == sender for k in self.inbound) or any(c[0][0] == sender for c in self.claims.values()):
            return False
        held = Counter(k[0] for k in self.inbound if k not in self.claims)
        if not held:
            return False
        most = max(held.values())  # the data node with the most slots here gives one up (ties: the first)
        victim = min(k for k in self.inbound if k not in self.claims and held[k[0]] == most)
        self.claims[victim] = (ask, self.round_no)
        self.bus.send(victim[0], Claim(self.me, victim[1]))
        claimed.append(victim)
        return True

    def _on_claim(self, msg: Claim, card: PeerCard) -> None:
        """A data node gives a first hop up for another data node that has none, if it keeps one (`_claim_for`)."""
        self._expect_stage(card, self.card.stage + 1)
        out = self.outbound.get(msg.slot)
        if not self.is_data or out is None or out.peer != msg.sender or not out.held:
            return
        if len(self.units()) >= 2:
            self._drop_out(msg.slot)  # the microbatch is routed again; the slot is the relay's to give on
            self.bus.send(msg.sender, Yield(self.me, msg.slot))

    def _on_yield(self, msg: Yield, card: PeerCard) -> None:
        self._expect_stage(card, 0)
        key = (msg.sender, msg.slot)
        claim = self.claims.pop(key, None)
        if key not in self.inbound:
            return
        if claim is None or (claim[0][0], claim[0][1]) in self.inbound:
            self._drop_in(key)  # nobody waits for it (any more): as a Release
            return
        sender, n, label, prefix, share = claim[0]
        self._rekey(key, (sender, n), label, prefix).share = share  # the chain continues the newcomer
        self.bus.send(sender, Reply(self.me, (n,), (), self.spare))
        self.claimed += 1

    def _starving(self) -> bool:
        """With `evict`: a data node with no first hop and no request out asks a full stage-1 relay anyway, one
        microbatch at a time (see `_claim_for`)."""
        if not (self.is_data and self.cfg.evict) or self.units():
            return False
        return all(o.held for o in self.outbound.values())
