"""Cross-relay exchanges (`AgentConfig.exchange`; off by default, see AgentConfig for the measurements): two
same-stage relays swap next hops (design.md's improvement move). In a saturated stage a costly path cannot move (no
room), and the local swap (core.py) only re-pairs continuations at one relay.

Rounds: t, i offers its costliest microbatch A (on slot m at j) to the next-stage peer j* that would carry it more
cheaply (`Offer`), and permits j to hand slot m to whoever presents the offer's token (`Permit`); t+1, j* picks the
microbatch B it carries (from i') that would do best at j and forwards the offer (`Match`); t+2, i' checks the
exchange with its own figures and, if it lowers the costlier of the two paths, sends both `Transfer`s and tells i
(`Swapped`); t+3, j* and j re-key their slots and i and i' switch, all in one round, so no path is ever half-moved
at the end of a round. `Declined`: no partner, or the partner turned it down; i may offer again.

The handlers run whatever the flag: a relay that does not offer still takes part in others' exchanges, and
`Transfer` is also the last step of a takeover (takeover.py). Its tables (in AgentState): `offers`, `matched`,
`permits`, `switches`, `withdrawn` and the counter `exchanges`.
"""

from __future__ import annotations

from gwtf.errors import BadMessage
from gwtf.routing.agent.core import AgentCore
from gwtf.routing.agent.messages import Declined, Lost, Match, Offer, Permit, Release, Swapped, Transfer
from gwtf.routing.agent.state import EXPIRY_ROUNDS, MAX_COST, OutSlot, PeerCard, SlotKey


class Exchanges(AgentCore):
    """Overrides the hooks `_begin_round` (`_switch`) and `_improve` (`_offer`); handles `Offer`, `Permit`,
    `Match`, `Declined`, `Swapped` and `Transfer`."""

    def _begin_round(self) -> None:
        self._switch()
        super()._begin_round()

    def _improve(self) -> None:
        self._offer()
        super()._improve()

    def _offer(self) -> None:
        """Offer my costliest microbatch whose continuation a next-stage peer could carry more cheaply (by its
        advert) for an exchange: in a saturated stage a costly path cannot move (no room), and the local swap
        only re-pairs continuations at one relay. One offer at a time."""
        # No partner took an offer this old (a Swapped comes 3 rounds after); permits are held by its next hop,
        # which may be a last-stage relay that never offers anything itself.
        self._forget(self.offers, self.permits, self.withdrawn)
        if not self.cfg.exchange or self.offers or self.is_last:
            return
        for key in self._costliest_first():
            slot = self.inbound[key]
            if key in self.handovers or not self._exchangeable(slot):
                continue
            assert slot.out is not None
            out = self.outbound[slot.out]
            here = self._value(slot.out, slot.label)
            slot.offered = self.round_no
            options = [
                (self._option(p, slot.label), p)
                for p, st in self.next.items()
                if st.heard and p != out.peer and slot.label in st.cost
            ]
            if not options or min(options)[0] >= here - self.cfg.margin:
                continue
            jstar = min(options)[1]
            number = self.next_no
            self.next_no += 1
            self.offers[slot.out] = (number, jstar, self.round_no)
            chain = tuple(sorted(out.chain.items()))
            self.bus.send(out.peer, Permit(self.me, slot.out, number))
            self.bus.send(jstar, Offer(self.me, slot.out, out.peer, slot.label, round(slot.prefix, 4), chain, number))
            return

    def _valid_offer(self, offer: Offer) -> PeerCard:
        """An Offer's fields: a known offerer one stage before `peer`, a known sink, finite bounded numbers."""
        ok = isinstance(offer, Offer) and isinstance(offer.slot, int) and isinstance(offer.number, int)
        origin = self.known.get(offer.sender) if ok and isinstance(offer.sender, str) else None
        peer = self.known.get(offer.peer) if ok and isinstance(offer.peer, str) else None
        if origin is None or peer is None or peer.stage != origin.stage + 1 or offer.label not in self.sink_regions:
            raise BadMessage("offer from or about an unknown peer, or for an unknown sink")
        if not (isinstance(offer.prefix, float | int) and 0 <= offer.prefix < MAX_COST):
            raise BadMessage("offer prefix negative, NaN or huge")
        return origin

    def _on_offer(self, msg: Offer, card: PeerCard) -> None:
        """j*: find the upstream microbatch here that would do better at the offer's j, and ask its sender."""
        self._expect_stage(card, self.card.stage - 1)
        self._valid_offer(msg)
        if msg.peer == self.me:
            raise BadMessage("offer to exchange with the peer it already continues at")
        chain_j = self._valid_cost(msg.chain)
        label_a, pref_a = msg.label, float(msg.prefix)
        if label_a not in chain_j:
            return
        old_a = pref_a + self.costs.link(msg.sender, msg.peer) + chain_j[label_a]
        best: tuple[float, SlotKey] | None = None
        for key, slot in self.inbound.items():
            if key[0] == msg.sender or self.round_no - self.matched.get(key, -(10**9)) <= EXPIRY_ROUNDS:
                continue
            here = self._chain_of(slot)  # my compute + the rest, per sink region
            if slot.label not in here or label_a not in here or slot.label not in chain_j:
                continue
            before_me = slot.prefix - self.card.compute_s - self.costs.link(key[0], self.me)  # B's prefix at i'
            old = max(old_a, slot.prefix - self.card.compute_s + here[slot.label])
            new = max(
                pref_a + self.costs.link(msg.sender, self.me) + here[label_a],
                before_me + self.costs.link(key[0], msg.peer) + chain_j[slot.label],
            )
            if old - new > self.cfg.margin and (best is None or old - new > best[0]):
                best = (old - new, key)
        if best is None:
            self.bus.send(msg.sender, Declined(self.me, msg.slot))
            return
        key = best[1]
        self.matched[key] = self.round_no
        self.bus.send(key[0], Match(self.me, key[1], msg))

    def _on_permit(self, msg: Permit, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage - 1)
        if not (isinstance(msg.slot, int) and isinstance(msg.token, int)):
            raise BadMessage("malformed permit")
        if (msg.sender, msg.slot) in self.inbound:
            self.permits[(msg.sender, msg.slot)] = (msg.token, self.round_no)

    def _on_match(self, msg: Match, card: PeerCard) -> None:
        """i': check the exchange with my own figures; if it lowers the costlier path, hand my slot at j* to i and
        take i's slot at j (both Transfers), tell i, and switch next round, when both holders have re-keyed."""
        self._expect_stage(card, self.card.stage + 1)
        offer = msg.offer
        origin = self._valid_offer(offer)
        if origin.stage != self.card.stage or offer.sender == self.me or offer.peer == msg.sender:
            raise BadMessage("match for an offer from a peer of another stage, or about the same next hop")
        chain_j = self._valid_cost(offer.chain)
        if not self._take(msg, chain_j):
            self.bus.send(offer.sender, Declined(self.me, offer.slot))

    def _take(self, msg: Match, chain_j: dict[str, float]) -> bool:
        offer = msg.offer
        out = self.outbound.get(msg.theirs) if isinstance(msg.theirs, int) else None
        if out is None or out.peer != msg.sender or not out.held:
            return False
        key = out.paired
        slot = self.inbound.get(key)
        # Two relays that offered each other's next hop at once: the one with the smaller id takes the match and
        # withdraws its own offer (a Swapped that still comes for it is undone), the other declines.
        mirror = msg.theirs in self.offers and self.me < offer.sender
        if mirror:
            self.withdrawn[msg.theirs] = self.offers.pop(msg.theirs)
        if (
            slot is None
            or slot.out != msg.theirs
            or key in self.handovers
            or not self._exchangeable(slot, partner=True)
        ):
            return False
        la, lb = offer.label, slot.label
        if la not in out.chain or lb not in out.chain or la not in chain_j or lb not in chain_j:
            return False
        old = max(offer.prefix + self.costs.link(offer.sender, offer.peer) + chain_j[la], self._total(key))
        prefix_a = round(float(offer.prefix) + self.costs.link(offer.sender, msg.sender), 4)
        prefix_b = round(slot.prefix + self.costs.link(self.me, offer.peer), 4)
        if old - max(prefix_a + out.chain[la], prefix_b + chain_j[lb]) <= self.cfg.margin:
            return False
        mine = self.next_no
        self.next_no += 1
        self.outbound[mine] = OutSlot(
            offer.peer, key, self.round_no, held=True, chain=chain_j, sent=(lb, prefix_b), quiet_until=self.round_no + 3
        )
        self.switches.append((key, mine, msg.theirs))
        slot.swapped, out.quiet_until = self.round_no, self.round_no + 2  # no swap, no update until the switch
        self.bus.send(msg.sender, Transfer(self.me, self.me, msg.theirs, offer.sender, offer.number, la, prefix_a))
        self.bus.send(
            offer.peer, Transfer(self.me, offer.sender, offer.slot, self.me, mine, lb, prefix_b, offer.number)
        )
        self.bus.send(offer.sender, Swapped(self.me, offer.slot, tuple(sorted(out.chain.items()))))
        return True

    def _on_declined(self, msg: Declined, card: PeerCard) -> None:
        if card.stage not in (self.card.stage, self.card.stage + 1) or not isinstance(msg.slot, int):
            raise BadMessage("declined from a peer of an unrelated stage, or malformed")
        self.offers.pop(msg.slot, None)

    def _on_swapped(self, msg: Swapped, card: PeerCard) -> None:
        """i: my offer was taken; my microbatch switches to its slot at j* next round (j* re-keys this round)."""
        self._expect_stage(card, self.card.stage)
        if not isinstance(msg.slot, int):
            raise BadMessage("malformed swapped")
        chain = self._valid_cost(msg.chain)
        pending = self.offers.pop(msg.slot, None)
        if pending is None:
            late = self.withdrawn.pop(msg.slot, None)
            if late is not None:  # j* handed us its slot for an offer we withdrew: give it back
                self.bus.send(late[1], Release(self.me, (late[0],)))
            return  # or not ours: j refuses the partner's Transfer without our permit, and the partner re-routes
        number, jstar, _ = pending
        out = self.outbound.get(msg.slot)
        slot = self.inbound.get(out.paired) if out is not None else None
        if out is None or slot is None or slot.out != msg.slot:  # the microbatch left meanwhile
            self.bus.send(jstar, Release(self.me, (number,)))
            return
        prefix = round(slot.prefix + self._hop(jstar), 4)
        self.outbound[number] = OutSlot(
            jstar,
            out.paired,
            self.round_no,
            held=True,
            chain=chain,
            sent=(slot.label, prefix),
            quiet_until=self.round_no + 2,
        )
        slot.out, slot.swapped = number, self.round_no
        del self.outbound[msg.slot]
        self.exchanges += 1

    def _on_transfer(self, msg: Transfer, card: PeerCard) -> None:
        """A holder re-keys a slot handed to a same-stage peer: told by the slot's owner, or with its permit."""
        self._expect_stage(card, self.card.stage - 1)
        owner = self.known.get(msg.new_owner) if isinstance(msg.new_owner, str) else None
        if owner is None or owner.stage != card.stage or msg.new_owner == msg.owner or not isinstance(msg.number, int):
            raise BadMessage("transfer to an unknown or wrong-stage owner")
        if not self._valid_ask(msg.slot, msg.label, msg.prefix, 0) or not isinstance(msg.owner, str):
            raise BadMessage("malformed transfer")
        key, new = (msg.owner, msg.slot), (msg.new_owner, msg.number)
        permit = self.permits.pop(key, None)
        allowed = msg.owner == msg.sender or (
            permit is not None and permit[0] == msg.token and self.round_no - permit[1] <= 2 * EXPIRY_ROUNDS
        )
        if not allowed or key not in self.inbound or new in self.inbound:
            self.bus.send(msg.new_owner, Lost(self.me, (msg.number,)))  # the new owner routes its microbatch anew
            return
        self._rekey(key, new, msg.label, msg.prefix)
        self.matched.pop(key, None)

    def _switch(self) -> None:
        """i': the exchange's microbatch moves to its new slot now that the holders have re-keyed."""
        for key, new, old in self.switches:
            slot = self.inbound.get(key)
            self.outbound.pop(old, None)
            if slot is not None and slot.out == old:  # (new is gone if its holder died meanwhile: route anew)
                slot.out = new if new in self.outbound else None
                self.exchanges += slot.out is not None
            elif new in self.outbound:
                self._release_out(new)
        self.switches.clear()
