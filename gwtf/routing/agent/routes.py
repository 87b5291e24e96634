"""Route reports (`AgentConfig.routes`, on in a live swarm: gwtf.routing.p2p): each relay tells its upstream
holders, per slot, which relays the chain behind it goes through (`Route`), as chain costs travel up (core.py's
`ChainCost`), so a data node knows its paths relay by relay (`paths`). The simulator reads the same chains off the
agents instead (gwtf.routing.protocol, ProtocolRun._trace) and runs without them.

Its fields: `InSlot.sent_route` (what the upstream holder was told) and `OutSlot.route` (what the next hop said).
"""

from __future__ import annotations

from gwtf.errors import BadMessage
from gwtf.routing.agent.core import AgentCore
from gwtf.routing.agent.messages import Route
from gwtf.routing.agent.state import InSlot, PeerCard


class RouteReports(AgentCore):
    """Overrides the `_report` hook; handles `Route`; a data node's `paths`."""

    def _report(self) -> None:
        if self.cfg.routes:
            self._report_upstream(Route, "sent_route", self._route_of)
        super()._report()

    def _on_route(self, msg: Route, card: PeerCard) -> None:
        for n, route in self._downstream_entries(msg, card, "route"):
            if route and not self._valid_route(route, msg.sender):
                raise BadMessage("a route must list known relays of the next stages in order, the sender first")
            out = self.outbound.get(n)
            if out is not None and out.peer == msg.sender:
                out.route = route

    def _valid_route(self, route: tuple, sender: str) -> bool:
        stages = [self.known[p].stage if isinstance(p, str) and p in self.known else -1 for p in route]
        return route[0] == sender and stages == list(range(self.card.stage + 1, self.n_stages + 1))

    def _route_of(self, slot: InSlot) -> tuple[str, ...]:
        if self.is_last:
            return (self.me,)
        out = self._held_out(slot)
        return (self.me, *out.route) if out is not None and out.route else ()

    def paths(self) -> list[list[str]]:
        """A data node's complete paths, cheapest first, relay by relay (with `AgentConfig.routes`)."""
        return [list(o.route) for _, o in self.units() if len(o.route) == self.n_stages and o.route[0] == o.peer]
