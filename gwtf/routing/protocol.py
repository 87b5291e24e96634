"""Running the GWTF agents over a swarm: the DHT directory they read, their bounded neighbour sets, rounds,
convergence, crashes and joins, and the paths their state describes. Used by GWTFRouter and the simulator."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field

from gwtf.routing.agent import Agent, AgentConfig, InProcessBus, PeerCard
from gwtf.routing.base import Plan, SwarmView

logger = logging.getLogger(__name__)


class ViewCosts:
    """Link terms of d_ij from the view's link model, cached per region pair (per peer pair if measured)."""

    def __init__(self, view: SwarmView) -> None:
        self.view = view
        self.cache: dict[tuple, float] = {}

    def link(self, a: str, b: str) -> float:
        links = self.view.links
        key = (a, b) if links.measured else (links.regions.get(a), links.regions.get(b))
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = links.link_term(a, b, self.view.activation_bytes)
        return hit


@dataclass
class Directory:
    """The DHT as the agents see it: every peer's record, and which peers of a stage have spare capacity."""

    costs: ViewCosts
    cards: dict[str, PeerCard] = field(default_factory=dict)
    spare: dict[str, int] = field(default_factory=dict)
    by_stage_region: dict[tuple[int, str | None], list[str]] = field(default_factory=lambda: defaultdict(list))
    lookups: int = 0

    def add(self, card: PeerCard) -> None:
        self.cards[card.peer_id] = card
        self.spare[card.peer_id] = card.capacity
        self.by_stage_region[(card.stage, card.region)].append(card.peer_id)

    def remove(self, peer: str) -> None:
        card = self.cards.pop(peer, None)
        self.spare.pop(peer, None)
        if card is not None:
            self.by_stage_region[(card.stage, card.region)].remove(peer)

    def nearest(self, stage: int, me: str, k: int, rng: random.Random, need_spare: bool) -> list[PeerCard]:
        """Up to k peers of `stage`, from the regions with the cheapest link from `me`, random within one."""
        regions = sorted(
            (r for (s, r), peers in self.by_stage_region.items() if s == stage and peers),
            key=lambda r: (self.costs.link(me, self.by_stage_region[(stage, r)][0]), str(r)),
        )
        out: list[PeerCard] = []
        for region in regions:
            peers = [p for p in self.by_stage_region[(stage, region)] if p != me]
            if need_spare:
                peers = [p for p in peers if self.spare.get(p, 0) > 0]
            rng.shuffle(peers)
            out.extend(self.cards[p] for p in peers[: k - len(out)])
            if len(out) >= k:
                break
        return out

    def lookup(self, stage: int, me: str, k: int, rng: random.Random) -> list[PeerCard]:
        self.lookups += 1
        return self.nearest(stage, me, k, rng, need_spare=True)


def card_of(view: SwarmView, peer: str) -> PeerCard:
    if peer in view.relays:
        r = view.relays[peer]
        return PeerCard(peer, r.stage, r.region, r.compute_s, r.capacity)
    d = view.data_nodes[peer]
    return PeerCard(peer, 0, d.region, d.compute_s, 0)


class ProtocolRun:
    """All agents of a swarm, stepping in synchronous rounds over an in-process bus."""

    def __init__(self, view: SwarmView, demands: dict[str, int], cfg: AgentConfig | None = None, seed: int = 0):
        self.view, self.cfg, self.seed = view, cfg or AgentConfig(), seed
        self.rng = random.Random(seed)
        self.bus = InProcessBus()
        self.directory = Directory(ViewCosts(view))
        self.agents: dict[str, Agent] = {}
        self.round_no = 0
        self.sink_regions: dict[str, str] = {}
        for peer in sorted(view.data_nodes):
            self.sink_regions.setdefault(str(view.data_nodes[peer].region), peer)
        for peer in sorted(view.data_nodes) + sorted(view.relays):
            self.directory.add(card_of(view, peer))
        for peer in sorted(self.directory.cards):
            self._spawn(peer)
        for peer, count in sorted(demands.items()):
            if count > 0:
                self.agents[peer].add_units(count)

    def _spawn(self, peer: str, newcomer: bool = False) -> Agent:
        card = self.directory.cards[peer]
        agent = Agent(
            card,
            self.view.n_stages,
            self.directory.costs,
            self.bus,
            self.sink_regions,
            self.cfg,
            seed=self.rng.randrange(2**31),
        )
        agent.known = self.directory.cards  # records are public (DHT); state and neighbours are not
        self.agents[peer] = agent
        agent.meet(self.directory, newcomer)
        return agent

    # ------------------------------------------------------------------------------------------------ rounds

    def step(self) -> None:
        inboxes = self.bus.take()
        for peer, agent in self.agents.items():
            self.directory.spare[peer] = agent.spare if agent.card.stage else 0
        for peer in sorted(self.agents):
            self.agents[peer].step(self.round_no, inboxes.get(peer, []), self.directory)
        self.round_no += 1

    def run(self, rounds: int) -> list[tuple[int, float]]:
        """Step `rounds` times; returns (throughput, total cost) after each round."""
        trace = []
        for _ in range(rounds):
            self.step()
            plan = self.plan()
            trace.append((_count(plan), _cost(self.view, plan)))
        return trace

    # ---------------------------------------------------------------------------------------------- results

    def plan(self) -> Plan:
        """Complete paths only: every hop granted the slot and continues it on a slot it holds downstream."""
        plan: Plan = {}
        for peer in sorted(self.view.data_nodes):
            agent = self.agents.get(peer)
            if agent is None:
                continue
            paths = []
            for n, out in agent.units():
                path = self._trace(peer, n, out.peer)
                if path is not None:
                    paths.append(path)
            plan[peer] = paths
        return plan

    def _trace(self, prev: str, n: int, hop: str) -> list[str] | None:
        path = []
        for stage in range(1, self.view.n_stages + 1):
            agent = self.agents.get(hop)
            slot = agent.inbound.get((prev, n)) if agent is not None else None
            if agent is None or slot is None or agent.card.stage != stage:
                return None
            path.append(hop)
            if stage == self.view.n_stages:
                return path
            out = agent.outbound.get(slot.out) if slot.out is not None else None
            if out is None or not out.held or out.paired != (prev, n):
                return None
            prev, n, hop = hop, slot.out, out.peer  # type: ignore[assignment]
        return path

    def messages(self) -> int:
        return self.bus.sent + self.directory.lookups

    # ---------------------------------------------------------------------------------------- churn, locally

    def crash(self, peers: set[str]) -> set[str]:
        """Remove peers; only agents that knew them renegotiate. Returns the affected agents."""
        affected: set[str] = set()
        for peer in peers:
            self.agents.pop(peer, None)
            self.directory.remove(peer)
            self.bus.dead.add(peer)
        for name, agent in self.agents.items():
            touched = peers & (set(agent.next) | agent.subscribers)
            touched |= peers & ({o.peer for o in agent.outbound.values()} | {k[0] for k in agent.inbound})
            for peer in sorted(touched):
                agent.peer_died(peer)
            if touched:
                affected.add(name)
        return affected

    def join(self, cards: list[PeerCard]) -> None:
        for card in cards:
            self.bus.dead.discard(card.peer_id)
            self.directory.add(card)
        for card in cards:
            self._spawn(card.peer_id, newcomer=True)


def _count(plan: Plan) -> int:
    return sum(len(p) for p in plan.values())


def _cost(view: SwarmView, plan: Plan) -> float:
    return sum(view.path_cost(o, p) for o, paths in plan.items() for p in paths)
