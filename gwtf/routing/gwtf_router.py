"""GWTFRouter (router "gwtf"): the agents of every node of a view, run inside one process.

The simulator and `gwtf.benchmarks.flow` use it, and so does a live swarm under router "gwtf": each data node steps
every agent of its view of the swarm over the in-process bus, the same algorithm without the messages on the wire
(and two data nodes plan independently). Under router "gwtf-p2p" (gwtf.routing.p2p) every node runs its own
agent instead and the messages go over the runtime's transport. The state carries over between plans: on a crash
or a join only the agents that knew the departed peer, and the newcomer, renegotiate; everyone else keeps its slots.
"""

from __future__ import annotations

import logging

from gwtf.routing.agent import AgentConfig, PeerCard
from gwtf.routing.base import Plan, Router, SwarmView, validate_demands
from gwtf.routing.config import RoutingConfig
from gwtf.routing.protocol import ProtocolRun, card_of

logger = logging.getLogger(__name__)

RECOMPUTE_TOLERANCE = 0.25  # a relay whose compute time moved by more than this fraction renegotiates its slots


class GWTFRouter(Router):
    name = "gwtf"

    def __init__(
        self,
        seed: int = 0,
        rounds: int = 40,
        reconverge_rounds: int = 20,
        cfg: AgentConfig | None = None,
        routing: RoutingConfig | None = None,
    ):
        super().__init__(seed, routing)
        self.rounds, self.reconverge_rounds = rounds, reconverge_rounds
        self.cfg = cfg or AgentConfig(**self.routing.agent_moves())
        self.run: ProtocolRun | None = None
        self._demands: dict[str, int] = {}
        self.trace: list[tuple[int, float]] = []

    def plan(self, view: SwarmView, demands: dict[str, int]) -> Plan:
        validate_demands(view, demands)
        run = self.run
        if run is None or demands != self._demands or set(view.data_nodes) != set(run.view.data_nodes):
            self.run = ProtocolRun(view, demands, self.cfg, self.seed)
            self._demands = dict(demands)
            self.trace = self.run.run(self.rounds)
        else:
            self._update(run, view)
            self.trace = run.run(self.reconverge_rounds)
        assert self.run is not None
        return self._record(self.run.plan())

    def _update(self, run: ProtocolRun, view: SwarmView) -> None:
        """Crash the relays that left, add the ones that joined; the agents renegotiate locally. A relay whose
        record changed (its measured compute time by more than `RECOMPUTE_TOLERANCE`, or its capacity or region)
        renegotiates too, as if it had left and come back: its first records carry no measurement yet, and agents
        that kept those figures routed as if every relay were equally fast."""
        changed = {p for p in set(run.view.relays) & set(view.relays) if _changed(run.directory.cards[p], view, p)}
        if changed:
            logger.debug("gwtf: %d relays' figures changed; they renegotiate", len(changed))
        gone = set(run.view.relays) - set(view.relays) | changed
        new = sorted(set(view.relays) - set(run.view.relays) | changed)
        run.view = view
        run.directory.costs.view = view
        if gone:
            affected = run.crash(gone)
            logger.debug("gwtf: %d relays gone, %d agents renegotiate", len(gone), len(affected))
        if new:
            run.join([card_of(view, p) for p in new])


def _changed(card: PeerCard, view: SwarmView, peer: str) -> bool:
    relay = view.relays[peer]
    if (relay.stage, relay.region, relay.capacity) != (card.stage, card.region, card.capacity):
        return True
    old, now = max(card.compute_s, 1e-9), max(relay.compute_s, 1e-9)
    return max(old, now) / min(old, now) > 1 + RECOMPUTE_TOLERANCE
