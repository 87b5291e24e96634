"""The GWTF agent's protocol: cost adverts, slot requests and grants, routing, local swaps, chain-cost reports,
crashes and joins. `AgentCore` is the agent without its optional moves; each move's file adds one through the
hooks below, and `Agent` (agent.py) composes them all.

Each round a node:
- advertises its cost-to-sink per sink region (distance-vector: its compute plus the cheapest link + advertised
  cost over next-stage peers believed to have room; with none, over all of them plus `blocked_penalty`, a last
  resort rather than "unreachable", so room freed by a crash is used before the news has climbed back up) and
  its room, to the upstream peers that keep it as a candidate, when that changed or after it rejected someone;
- grants requested slots within its capacity, the shortest prefixes first: a microbatch that has come a long
  way has usually been turned down and wandered; measured, serving the direct ones first gives cheaper paths,
  the worst included, and no slower convergence (the min-max repair is the swap below). What it cannot grant it
  deflects to same-stage peers with room (deflect.py) or, at stage 1 with `evict`, claims back (claims.py);
- routes every microbatch it holds that has no next hop yet to a next-stage peer with room, the cheapest by
  link + advert or, at random, one nearly as cheap (weight exp(-extra / spread)): senders that all see the same
  cheapest peer would otherwise all ask it and all but a few be rejected, a round trip each; after each
  rejection the circle doubles and the DHT directory is asked afresh for peers with room. Requests are
  batched per peer; a microbatch advances one stage per round. Each request carries the share of its data
  node's demand that had a path when it set out, and contested room goes to the least served first (max-min
  fairness between data nodes: without it, the data nodes of a crowded region were starved, at N = 10,000
  some with no path at all). A microbatch that finds no peer with room for `patience` rounds is revoked
  (`Lost`) and its sender routes it elsewhere; a data node served at least `fair_share` holds back
  microbatches while its paths look blocked (they would only hold room that others need);
- reports upstream, per slot, what the chain behind it costs per sink region (`ChainCost`: costs travel up the
  chains as labels and prefixes travel down), so every node knows the exact cost of each path it carries;
- improves: two microbatches at the same relay swap their continuations when that lowers the costlier of the
  two paths (the min-max objective); a worse swap is taken with probability exp(-delta / T), T decaying
  (simulated annealing). The optional moves improve further (moves.py, exchange.py, takeover.py).
Crashes: a node told that a peer died re-routes the microbatches it sent there and releases the chains of those
that came from it (a `Release` travels down the chain). Joins: `Hello`.

Local knowledge: candidate sets are bounded (`AgentConfig.neighbours` per stage, cheapest links first, topped
up from the DHT directory now and then), so messages per node per round do not grow with the swarm. Trust:
every message is validated (sender is a known peer of the right stage, numbers finite and bounded, lists
bounded, slots known). A relay never grants more slots than its own capacity and never believes more room than
a peer's record states, so a peer lying about its capacity or cost can attract microbatches but cannot make
another node hold more than its capacity. A grant from a peer that was not asked (a deflected request) is taken
only for a request still pending, and the granting peer counted the slot against its own capacity.

Hooks: where the optional moves come in. Here they do nothing (or refuse); a move's file overrides the ones it
needs and calls super() after its own part, so the moves that share a hook act in the order `Agent` lists them.
    _begin_round   before the inbox: exchanged microbatches switch (exchange.py), handed-over ones leave
                   (takeover.py)
    _claim_for     an ask a full stage-1 relay cannot grant (claims.py; `_grant` is wrapped there too)
    _deflect       the asks left over, to same-stage peers with room (deflect.py)
    _starving      a data node with no first hop asks a full relay anyway (claims.py)
    _move          cheaper next hops built beside the current chain (moves.py)
    _improve       after routing: exchange offers (exchange.py), handovers (takeover.py)
    _report        after the chain costs: the chains' relays (routes.py)
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

from gwtf.errors import BadMessage
from gwtf.routing.agent.messages import (
    Advert,
    ChainCost,
    Hello,
    Lost,
    Message,
    Release,
    Reply,
    Request,
    Route,
    Transfer,
)
from gwtf.routing.agent.state import (
    EXPIRY_ROUNDS,
    INF,
    MAX_BATCH,
    MAX_COST,
    REPORT_AGAIN_ROUNDS,
    AgentState,
    InSlot,
    NeighbourState,
    OutSlot,
    PeerCard,
    SlotKey,
)

logger = logging.getLogger(__name__)


class AgentCore(AgentState):
    """One node's routing state machine, without the optional moves (see the module docstring)."""

    # ------------------------------------------------------------------------------------------ bookkeeping

    def add_next(self, card: PeerCard) -> None:
        self.learn(card)
        if card.peer_id not in self.next:
            self.next[card.peer_id] = NeighbourState(card, card.capacity, self.costs.link(self.me, card.peer_id))
            self.bus.send(card.peer_id, Hello(self.me, self.card.stage))

    def meet(self, directory, newcomer: bool) -> None:
        """First candidates from the directory: the nearest next-stage peers; a newcomer also tells the nearest
        previous-stage relays that it is there (they keep it as a candidate)."""
        k = self.cfg.neighbours
        if self.card.stage < self.n_stages:
            for other in directory.nearest(self.card.stage + 1, self.me, k, self.rng, need_spare=False):
                self.add_next(other)
        if newcomer and self.card.stage >= 2:
            for other in directory.nearest(self.card.stage - 1, self.me, k, self.rng, need_spare=False):
                self.bus.send(other.peer_id, Hello(self.me, self.card.stage))

    def add_same(self, card: PeerCard) -> None:
        self.learn(card)

    def add_units(self, count: int) -> None:
        """A data node's microbatches for this iteration."""
        label = str(self.card.region)
        for _ in range(count):
            self.inbound[(self.me, self.next_no)] = InSlot(label, self.card.compute_s)
            self.next_no += 1

    def units(self) -> list[tuple[int, OutSlot]]:
        """A data node's microbatches that have a first hop, the cheapest path first (by the chain costs it was
        told): when an iteration has more microbatches than paths, the extra waves take the first paths."""
        held = [
            (self._value(s.out, s.label), s.out)
            for s in self.inbound.values()
            if s.out is not None and self._held_out(s) is not None
        ]
        return [(n, self.outbound[n]) for _, n in sorted(held)]

    # --------------------------------------------------------------------------------------------- a round

    def step(self, round_no: int, inbox: list[Message], directory) -> None:
        self.round_no = round_no
        self._directory = directory
        self._begin_round()
        # Re-keyings first: a new owner's messages about a transferred slot may arrive with the transfer.
        for msg in sorted(inbox, key=lambda m: not isinstance(m, Transfer)):
            try:
                self._handle(msg)
            except BadMessage as exc:
                self.rejected += 1
                logger.debug("%s dropped %s: %s", self.me, type(msg).__name__, exc)
        self._grant()
        if not self.is_last:
            self._expire()
            self._route(directory)
            self._move()
            self._swap()
        self._improve()
        if not self.is_last:
            self._send_updates()
        self._flush()
        self._report_upstream(ChainCost, "sent_cost", self._cost_of)
        self._report()
        self._advertise()
        self._hello_again()

    def peer_died(self, peer: str) -> None:
        """Local renegotiation: microbatches sent to `peer` are routed elsewhere; those from it are released."""
        self.next.pop(peer, None)
        self.subscribers.discard(peer)
        for n in [n for n, o in self.outbound.items() if o.peer == peer]:
            self._drop_out(n)
        for key in [k for k in self.inbound if k[0] == peer]:
            self._drop_in(key)

    # ------------------------------------------------------------------------------------------------ hooks

    def _begin_round(self) -> None:
        """Before the round's messages: what the moves left pending last round settles."""

    def _claim_for(self, ask: tuple[str, int, str, float, float], claimed: list) -> bool:
        """An ask this full relay cannot grant: True if a move took care of it (claims.py)."""
        return False

    def _deflect(self, overflow: list[tuple[str, int, str, float, float]]) -> list[SlotKey]:
        """Asks this relay cannot grant, passed on to peers with room (deflect.py); returns those left to reject."""
        return [(sender, n) for sender, n, *_ in overflow]

    def _starving(self) -> bool:
        """A data node that may ask a full next-stage relay for a slot anyway (claims.py)."""
        return False

    def _move(self) -> None:
        """Microbatches on costly chains move to cheaper ones built beside them (moves.py)."""

    def _improve(self) -> None:
        """After routing and swaps: the moves that change who carries a microbatch (exchange.py, takeover.py)."""

    def _report(self) -> None:
        """After the chain costs: more per-slot reports upstream (routes.py)."""

    # -------------------------------------------------------------------------------------------- handlers

    def _handle(self, msg: Message) -> None:
        card = self.known.get(msg.sender)
        if card is None:
            raise BadMessage(f"unknown sender {msg.sender}")
        handler = getattr(self, f"_on_{type(msg).__name__.lower()}")
        handler(msg, card)

    def _expect_stage(self, card: PeerCard, stage: int) -> None:
        if card.stage != stage:
            raise BadMessage(f"sender is not a stage-{stage} peer")

    def _valid_cost(self, cost) -> dict[str, float]:
        if len(cost) > len(self.sink_regions) or any(not (isinstance(e, tuple) and len(e) == 2) for e in cost):
            raise BadMessage("cost list malformed or longer than the sink regions")
        out = {}
        for g, c in cost:
            if g not in self.sink_regions or not isinstance(c, float | int) or not 0 <= c < MAX_COST:
                raise BadMessage("unknown region, or negative, NaN or huge cost")
            out[g] = float(c)
        return out

    def _on_hello(self, msg: Hello, card: PeerCard) -> None:
        if card.stage != msg.stage:
            raise BadMessage("hello from a peer without a matching record")
        if card.stage == self.card.stage - 1:
            self.subscribers.add(card.peer_id)
            self.last_advert = None  # the newcomer needs our figures
        elif card.stage == self.card.stage + 1 and len(self.next) < 2 * self.cfg.neighbours:
            self.add_next(card)  # a newcomer next door: a candidate for our microbatches

    def _on_advert(self, msg: Advert, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage + 1)
        if not (math.isfinite(msg.compute_s) and msg.compute_s >= 0):
            raise BadMessage("malformed advert")
        cost = self._valid_cost(msg.cost)
        state = self.next.get(msg.sender)
        if state is not None:  # adverts from peers we did not choose are ignored: bounded state
            state.spare = max(0, min(msg.spare, card.capacity))  # never believe more than the record's capacity
            state.cost, state.heard = cost, True

    def _on_request(self, msg: Request, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage - 1)
        if len(msg.slots) > MAX_BATCH or any(not (isinstance(e, tuple) and len(e) == 4) for e in msg.slots):
            raise BadMessage("too many or malformed slot entries")
        fresh = sum(1 for e in msg.slots if (msg.sender, e[0]) not in self.inbound)
        if fresh > max(self.card.capacity, 1):
            raise BadMessage(f"request for {fresh} new slots, more than our recorded capacity")
        rejected = []
        for n, label, prefix, share in msg.slots:
            if not self._valid_ask(n, label, prefix, share):
                rejected.append(n)
                continue
            slot = self.inbound.get((msg.sender, n))
            if slot is not None:  # the microbatch on a slot already granted changed: it travels down the chain
                slot.label, slot.prefix = label, float(prefix) + self.card.compute_s
            else:
                self._asks.append((msg.sender, n, label, float(prefix), float(share)))
        if rejected:
            self.bus.send(msg.sender, Reply(self.me, (), tuple(rejected), self.spare))
            self.last_advert = None

    def _valid_ask(self, n, label, prefix, share) -> bool:
        """One (slot, label, prefix, share) entry of a Request or Deflect: a known sink, finite bounded numbers."""
        if not (isinstance(n, int) and label in self.sink_regions and isinstance(prefix, float | int)):
            return False
        return isinstance(share, float | int) and 0 <= share <= 1 and 0 <= prefix < MAX_COST

    def _grant(self) -> None:
        """Grant new slots within capacity: the least served data nodes first (by tenths of their demand), then
        the shortest prefixes (see the module docstring). What does not fit may be claimed back from another data
        node (`_claim_for`, claims.py) or deflected to peers with room (`_deflect`, deflect.py)."""
        if not self._asks:
            return
        accepted: dict[str, list[int]] = defaultdict(list)
        rejected: dict[str, list[int]] = defaultdict(list)
        overflow = []
        claimed: list[SlotKey] = []
        for ask in sorted(self._asks, key=lambda a: (round(a[4], 1), a[3], a[0], a[1])):
            sender, n, label, prefix, share = ask
            if len(self.inbound) < self.card.capacity and (sender, n) not in self.inbound:
                self.inbound[(sender, n)] = InSlot(label, prefix + self.card.compute_s, share=share)
                accepted[sender].append(n)
            elif self._claim_for(ask, claimed):
                continue
            elif (sender, n) not in self.inbound and (sender, n) not in self._via and self.cfg.deflect:
                overflow.append(ask)
            else:
                rejected[sender].append(n)
        self._asks.clear()
        self._via.clear()
        for sender, n in self._deflect(overflow):
            rejected[sender].append(n)
        for sender in sorted(set(accepted) | set(rejected)):
            self.bus.send(sender, Reply(self.me, tuple(accepted[sender]), tuple(rejected[sender]), self.spare))
        if rejected:  # the rejected believe we are full from now on: they hear from us when that changes
            self.last_advert = None

    def _on_reply(self, msg: Reply, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage + 1)
        for n in msg.accepted:
            out = self.outbound.get(n)
            if out is not None and out.peer == msg.sender:
                out.held = True
            elif out is not None and not out.held:  # the peer we asked deflected the request to this one
                out.peer, out.held = msg.sender, True
            else:  # we no longer want it there
                self.bus.send(msg.sender, Release(self.me, (n,)))
        for n in msg.rejected:
            out = self.outbound.get(n)
            if out is not None and not out.held:
                slot = self.inbound.get(out.paired)
                if slot is not None and slot.out == n:
                    slot.rejected += 1
                self._drop_out(n)
            elif out is not None and out.peer == msg.sender:  # held here, not there (its Lost was lost): route anew
                self._drop_out(n)
        state = self.next.get(msg.sender)
        if state is not None:
            state.spare = max(0, min(msg.spare, card.capacity))

    def _on_lost(self, msg: Lost, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage + 1)
        for n in msg.slots:
            out = self.outbound.get(n)
            if out is not None and out.peer == msg.sender:
                self._drop_out(n)
        if msg.sender in self.next:
            self.next[msg.sender].spare = 0

    def _on_release(self, msg: Release, card: PeerCard) -> None:
        self._expect_stage(card, self.card.stage - 1)
        for n in msg.slots:
            if (msg.sender, n) in self.inbound:
                self._drop_in((msg.sender, n))

    def _downstream_entries(self, msg: ChainCost | Route, card: PeerCard, what: str) -> list[tuple[int, tuple]]:
        """A per-slot report from a next-stage peer: (slot, tuple) pairs, bounded."""
        self._expect_stage(card, self.card.stage + 1)
        if len(msg.slots) > MAX_BATCH:
            raise BadMessage(f"{what} list too long")
        for entry in msg.slots:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], tuple)):
                raise BadMessage(f"malformed {what} entry")
        return list(msg.slots)

    def _on_chaincost(self, msg: ChainCost, card: PeerCard) -> None:
        for n, cost in self._downstream_entries(msg, card, "chain cost"):
            chain = self._valid_cost(cost)
            out = self.outbound.get(n)
            if out is not None and out.peer == msg.sender:
                out.chain = chain
            elif out is None and isinstance(n, int):  # a slot we no longer have (e.g. after an exchange): free it
                self.bus.send(msg.sender, Release(self.me, (n,)))

    # ----------------------------------------------------------------------------------------- slot changes

    def _new_out(self, key: SlotKey, peer: str, move: bool) -> None:
        slot = self.inbound[key]
        n = self.next_no
        self.next_no += 1
        prefix = round(slot.prefix + self._hop(peer), 4)
        self.outbound[n] = OutSlot(peer, key, self.round_no, move=move, sent=(slot.label, prefix))
        if not move:
            slot.out = n
        self._requests[peer].append((n, slot.label, prefix, slot.share))
        state = self.next.get(peer)
        if state is not None:
            state.spare = max(0, state.spare - 1)

    def _drop_out(self, n: int) -> None:
        out = self.outbound.pop(n)
        slot = self.inbound.get(out.paired)
        if slot is not None and slot.out == n:
            slot.out = None

    def _release_out(self, n: int) -> None:
        out = self.outbound.pop(n)
        self.bus.send(out.peer, Release(self.me, (n,)))

    def _drop_in(self, key: SlotKey) -> None:
        """The microbatch left: its chain downstream (and any chain being built for it) is given back."""
        self.inbound.pop(key)
        for n in [n for n, o in self.outbound.items() if o.paired == key]:
            self._release_out(n)

    def _revoke(self, keys: list[SlotKey]) -> None:
        lost: dict[str, list[int]] = defaultdict(list)
        for key in keys:
            self._drop_in(key)
            lost[key[0]].append(key[1])
        for dst, ns in lost.items():
            self.bus.send(dst, Lost(self.me, tuple(ns)))

    def _rekey(self, key: SlotKey, new: SlotKey, label: str, prefix: float) -> InSlot:
        """In-slot `key` now carries the microbatch of `new` (label, path cost up to the upstream holder): the slot
        and the chains behind it stay; the new holder is told what they cost (and go through) afresh."""
        slot = self.inbound.pop(key)
        slot.label, slot.prefix = label, float(prefix) + self.card.compute_s
        slot.sent_cost = slot.sent_route = None
        self.inbound[new] = slot
        for out in self.outbound.values():
            if out.paired == key:
                out.paired = new
        return slot

    # ------------------------------------------------------------------------------------------------ costs

    def _hop(self, peer: str) -> float:
        state = self.next.get(peer)
        return state.hop if state is not None else self.costs.link(self.me, peer)

    def _option(self, peer: str, label: str) -> float:
        """Cost of sending a new microbatch of `label` to `peer`: link + its advert (an estimate until heard)."""
        state = self.next[peer]
        if state.heard:
            return state.hop + state.cost.get(label, INF)
        sink = self.sink_regions.get(label)
        if sink is None:  # the region's last data node left (its microbatches are being released): no sink there
            return INF
        card = state.card  # not heard yet: assume the rest of the path stays in that peer's region
        rest = (self.n_stages - card.stage + 1) * card.compute_s
        return state.hop + rest + self.costs.link(peer, sink)

    def _value(self, n: int, label: str) -> float:
        """Cost of carrying a microbatch of `label` on out-slot n from here to its sink."""
        out = self.outbound[n]
        if label in out.chain:
            return self._hop(out.peer) + out.chain[label]
        if out.peer in self.next:
            return self._option(out.peer, label)
        return INF

    def _options(self, label: str) -> list[tuple[float, str]]:
        return sorted((v, p) for p, st in self.next.items() if st.spare > 0 and (v := self._option(p, label)) < INF)

    def _total(self, key: SlotKey) -> float:
        slot = self.inbound[key]
        return slot.prefix + (self._value(slot.out, slot.label) if slot.out is not None else INF)

    # -------------------------------------------------------------------------------------------- decisions

    def _expire(self) -> None:
        """A request unanswered for longer than a round trip (dropped, or the peer died) is given up."""
        for n in [n for n, o in self.outbound.items() if not o.held and self.round_no - o.asked > EXPIRY_ROUNDS]:
            peer = self.outbound[n].peer
            self._drop_out(n)
            self.bus.send(peer, Release(self.me, (n,)))  # in case the grant is still on its way
            if peer in self.next:
                self.next[peer].spare = 0

    def _route(self, directory) -> None:
        """Every microbatch without a next hop asks the cheapest peer with room; after `patience` rounds
        without one, a relay revokes it so that its sender routes it elsewhere."""
        waiting = sorted((k for k, s in self.inbound.items() if s.out is None), key=lambda k: -self.inbound[k].prefix)
        if not waiting or (self.is_data and self.round_no < self.cfg.settle):
            return
        give_up = []
        for key in waiting:
            slot = self.inbound[key]
            options = self._options(slot.label)
            # None, or turned down before: what we believe of our neighbours' room is stale, ask the directory.
            stale = not options or slot.rejected > 0
            due = self.round_no - self.last_refresh >= self.cfg.refresh_every
            if stale and due and self._refresh(directory, self.cfg.lookup):
                options = self._options(slot.label)
            if self.is_data:
                slot.share = round(len(self.units()) / len(self.inbound), 2)
                # A data node sends nothing into a path that looks blocked (it would only hold room that others
                # need) unless it is served less than its fair share: then it tries, and wins contested room.
                if slot.share >= self.cfg.fair_share:
                    options = [(v, p) for v, p in options if v < self.cfg.blocked_penalty]
            if options:
                self._new_out(key, self._pick(options, slot.rejected), move=False)
                continue
            if self._starving() and (full := sorted((st.hop, p) for p, st in self.next.items())):
                self._new_out(key, full[0][1], move=False)  # no room anywhere: the relay claims a slot for us
                continue
            slot.waited += 1
            if slot.waited > self.cfg.patience and not self.is_data:
                give_up.append(key)
        self._revoke(give_up)

    def _pick(self, options: list[tuple[float, str]], rejected: int) -> str:
        """One of the near-cheapest peers, at random by believed room: upstream peers that all see the same
        cheapest peer would otherwise all ask it at once, and all but a few be rejected (a round trip each).
        Each time a microbatch was turned down the circle widens: where room is scarce, speed beats thrift."""
        best = options[0][0]
        spread = self.cfg.spread * 2 ** min(rejected, 4)
        near = [(v, p) for v, p in options if v <= best + 5 * spread]
        weights = [self.next[p].spare * math.exp(-(v - best) / spread) for v, p in near]
        return self.rng.choices([p for _, p in near], weights=weights)[0]

    def _swap(self) -> None:
        """Two microbatches here swap continuations when that lowers the costlier of their two paths."""
        if self.is_data:
            return
        keys = sorted(
            k
            for k, s in self.inbound.items()
            if (o := self._held_out(s)) is not None
            and s.label in o.chain
            and self.round_no - s.swapped >= self.cfg.swap_cooldown
            and s.out not in self.offers
            and k not in self.handovers
        )
        if len(keys) < 2:
            return
        temperature = self.cfg.temperature0 * self.cfg.cooling**self.round_no
        for a in range(len(keys)):
            for b in range(a + 1, len(keys)):
                sa, sb = self.inbound[keys[a]], self.inbound[keys[b]]
                oa, ob = sa.out, sb.out
                assert oa is not None and ob is not None
                if sb.label not in self.outbound[oa].chain or sa.label not in self.outbound[ob].chain:
                    continue
                old = max(sa.prefix + self._value(oa, sa.label), sb.prefix + self._value(ob, sb.label))
                new = max(sa.prefix + self._value(ob, sa.label), sb.prefix + self._value(oa, sb.label))
                delta = new - old
                if delta < -self.cfg.margin or (delta > 0 and self._anneal(delta, temperature)):
                    sa.out, sb.out = ob, oa
                    sa.swapped = sb.swapped = self.round_no
                    self.outbound[ob].paired, self.outbound[oa].paired = keys[a], keys[b]

    def _anneal(self, delta: float, temperature: float) -> bool:
        return temperature > 1e-6 and self.rng.random() < math.exp(-delta / temperature)

    def _send_updates(self) -> None:
        """Labels and prefixes travel down the chains when the microbatch on a slot changed, and every
        REPORT_AGAIN_ROUNDS rounds anyway: a held slot whose Lost was lost is then asked for afresh (granted again,
        or rejected and routed anew, `_on_reply`)."""
        for n, out in self.outbound.items():
            slot = self.inbound.get(out.paired)
            if not out.held or slot is None or self.round_no < out.quiet_until or n in self.offers:
                continue
            want = (slot.label, round(slot.prefix + self._hop(out.peer), 4))
            if want != out.sent or self.round_no - max(out.asked, out.updated) >= REPORT_AGAIN_ROUNDS:
                out.sent, out.updated = want, self.round_no
                self._requests[out.peer].append((n, *want, slot.share))

    def _flush(self) -> None:
        for dst, slots in self._requests.items():
            self._send_batches(dst, Request, slots)
        self._requests.clear()

    def _send_batches(self, dst: str, kind: type[Request] | type[ChainCost] | type[Route], items: list) -> None:
        """Per-slot entries to one peer, in messages of at most MAX_BATCH (validated lists are bounded)."""
        for k in range(0, len(items), MAX_BATCH):
            self.bus.send(dst, kind(self.me, tuple(items[k : k + MAX_BATCH])))

    # ----------------------------------------------------------------------------------- reports and adverts

    def _chain_of(self, slot: InSlot) -> dict[str, float]:
        c = self.card.compute_s
        if self.is_last:
            return {g: c + self.costs.link(self.me, rep) for g, rep in self.sink_regions.items()}
        out = self._held_out(slot)
        if out is None or not out.chain:
            return {}
        assert slot.out is not None
        return {g: c + self._value(slot.out, g) for g in out.chain}

    def _cost_of(self, slot: InSlot) -> tuple[tuple[str, float], ...]:
        return tuple(sorted((g, round(v, 4)) for g, v in self._chain_of(slot).items() if v < MAX_COST))

    def _report_upstream(self, kind: type[ChainCost] | type[Route], sent: str, value_of) -> None:
        """Tell each upstream holder, per slot, what the chain behind it is now by `value_of` (its cost per sink
        region, or with `routes` its relays), when that changed from what it was told (the slot's `sent` field); the
        chain cost also every REPORT_AGAIN_ROUNDS rounds, so that a slot whose Release was lost is released."""
        if self.is_data:
            return
        updates: dict[str, list[tuple[int, tuple]]] = defaultdict(list)
        for (up, n), slot in self.inbound.items():
            if self.round_no < slot.quiet_until:
                continue
            value, told = value_of(slot), getattr(slot, sent)
            again = kind is ChainCost and told is not None and self.round_no - slot.cost_told >= REPORT_AGAIN_ROUNDS
            if (value != told and (value or told)) or again:
                setattr(slot, sent, value)
                if kind is ChainCost:
                    slot.cost_told = self.round_no
                updates[up].append((n, value))
        for dst, items in updates.items():
            self._send_batches(dst, kind, items)

    def _hello_again(self) -> None:
        """Next-stage peers never heard from are greeted again every REPORT_AGAIN_ROUNDS rounds: live, a Hello that
        arrives before its receiver has read the sender's record is dropped (unknown sender), and the sender would
        never be sent the peer's adverts (seen in processes: both relays of a 2-stage run unsubscribed for good)."""
        if self.round_no % REPORT_AGAIN_ROUNDS:
            return
        for peer in sorted(p for p, state in self.next.items() if not state.heard):
            self.bus.send(peer, Hello(self.me, self.card.stage))
        # Fewer candidates than it keeps (a read that missed a record declared one dead, `peer_died`): look again in
        # the directory, room or not, as at the start; a newly added one is greeted (`add_next`). Without it a relay
        # whose only next-stage peer was once missed from a read waited for a lookup that asks for room it never saw.
        nearest = getattr(self._directory, "nearest", None)
        if self.card.stage < self.n_stages and len(self.next) < self.cfg.neighbours and nearest is not None:
            for other in nearest(self.card.stage + 1, self.me, self.cfg.neighbours, self.rng, False):
                self.add_next(other)

    def _advertise(self) -> None:
        if self.is_data:
            return
        self.my_cost = self._cost_to_sink()
        advert_key = (self.spare, tuple(sorted((g, round(c, 2)) for g, c in self.my_cost.items())))
        # Unchanged figures are sent again every REPORT_AGAIN_ROUNDS rounds, as distance-vector protocols send
        # periodic updates (RIP, RFC 2453 section 3.8): an advert can be refused (it priced a data node's region that
        # its receiver had not read yet) or lost, and the receiver would keep the earlier one for good. Seen in
        # processes: a stage-2 relay advertised before any data node existed (no regions), its next advert was
        # refused, and stage 1 never routed to it.
        if advert_key == self.last_advert and self.round_no - self.last_advert_round < REPORT_AGAIN_ROUNDS:
            return
        self.last_advert, self.last_advert_round = advert_key, self.round_no
        msg = Advert(self.me, self.card.stage, advert_key[0], self.card.compute_s, advert_key[1])
        for peer in sorted(self.subscribers):
            self.bus.send(peer, msg)

    def _cost_to_sink(self) -> dict[str, float]:
        """Distance-vector: my compute + the cheapest next hop with room (a stage-S node: the hop home)."""
        c = self.card.compute_s
        if self.is_last:
            return {g: c + self.costs.link(self.me, rep) for g, rep in self.sink_regions.items()}
        roomy = [p for p, st in self.next.items() if st.spare > 0]
        # No next peer with room: a last resort, priced high rather than unreachable, so that room freed by a
        # crash downstream is used at once instead of after the news climbed back up stage by stage.
        penalty = 0.0 if roomy else self.cfg.blocked_penalty
        best = dict.fromkeys(self.sink_regions, INF)
        for p in roomy or self.next:
            state = self.next[p]
            if state.heard:  # an advert heard before a region's last data node left may still price it: skipped
                for g, v in state.cost.items():
                    if g in best:
                        best[g] = min(best[g], state.hop + v)
            else:
                for g in best:
                    best[g] = min(best[g], self._option(p, g))
        return {g: c + v + penalty for g, v in best.items() if v + penalty < MAX_COST}

    def _refresh(self, directory, k: int) -> set[str]:
        """Ask the DHT directory for next-stage peers with room (bounded), cheapest links first."""
        self.last_refresh = self.round_no
        found = set()
        for card in directory.lookup(self.card.stage + 1, self.me, k, self.rng):
            if card.peer_id not in self.next:
                self._evict_idle_next()
                self.add_next(card)
            state = self.next.get(card.peer_id)
            if state is not None:  # the directory's record is fresher than our last word from it
                state.spare = max(state.spare, 1)
                found.add(card.peer_id)
        return found

    def _evict_idle_next(self) -> None:
        if len(self.next) < 2 * self.cfg.neighbours:
            return
        used = {o.peer for o in self.outbound.values()}
        idle = [p for p, st in self.next.items() if p not in used and st.spare == 0]
        if idle:
            del self.next[self.rng.choice(sorted(idle))]

    # ------------------------------------------------------------------------------- what the moves share

    def _exchangeable(self, slot: InSlot, partner: bool = False) -> bool:
        """On a complete chain, settled (not swapped lately), not offered now (nor lately, to be offered)."""
        if slot.out is None or slot.out in self.offers or self._held_out(slot) is None:
            return False
        out = self.outbound[slot.out]
        if self.round_no < out.quiet_until or slot.label not in out.chain:
            return False
        return self.round_no - slot.swapped >= self.cfg.swap_cooldown if partner else self._rested(slot)

    def _rested(self, slot: InSlot) -> bool:
        """Not swapped, offered or handed over within the exchange cooldown."""
        return self.round_no - max(slot.swapped, slot.offered) >= self.cfg.exchange_cooldown

    def _costliest_first(self) -> list[SlotKey]:
        """My in-slots, the costliest path first (those without a next hop yet last)."""
        return sorted(self.inbound, key=lambda k: -self._total(k) if self.inbound[k].out is not None else 0)
