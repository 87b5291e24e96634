"""Test support: a whole swarm in one process.

`InProcessSwarm` runs relays and data nodes as asyncio peers of one event loop over the in-process transport and
in-memory membership: the same node code as a real swarm (gwtf.runtime), deterministic and fast. Processes on
hivemind are assembled by `gwtf join` from the same pieces (gwtf.runtime.assembly).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import SimpleNamespace

from gwtf.config import RunConfig, with_overrides
from gwtf.data import load_data
from gwtf.faults import Fault, FaultInjector, MessageFault
from gwtf.membership import InMemoryMembership
from gwtf.runtime.assembly import make_data_node, module_builder
from gwtf.runtime.datanode import DataNode
from gwtf.runtime.flights import IterationReport
from gwtf.runtime.relay import RelayNode
from gwtf.runtime.spec import NodeOptions, run_spec
from gwtf.transport import InProcessNetwork, InProcessTransport, LinkEmulator, Message

log = logging.getLogger(__name__)
QUICK_BEAT = ["membership.heartbeat_s=0.2", "membership.record_ttl_s=1.0"]


@dataclass
class StepResult:
    iteration: int
    loss: float  # mean over every microbatch of the step, all data nodes
    reports: list[IterationReport]


class InProcessSwarm:
    """Relays (`replicas[k-1]` for stage k) and data nodes as peers of one event loop."""

    def __init__(
        self,
        cfg: RunConfig,
        replicas: int | list[int] = 1,
        data_nodes: int = 1,
        settings: list[str] | None = None,
        capacity: int = 4,
        run_id: str = "inproc",
        emulator: LinkEmulator | None = None,
        regions: dict[str, str] | None = None,
        faults: list[Fault | MessageFault] | None = None,
    ):
        # `settings`: the run's settings as `section.key=value` overrides (default: a quick heartbeat)
        cfg = with_overrides(cfg, QUICK_BEAT if settings is None else settings)
        self.cfg, self.run_id, self.capacity = cfg, run_id, capacity
        self.spec = run_spec(run_id, cfg, data_nodes)
        n = self.spec.model.n_stages
        self.replicas = [replicas] * n if isinstance(replicas, int) else list(replicas)
        if len(self.replicas) != n:
            raise ValueError(f"replicas per stage: need {n} entries, got {len(self.replicas)}")
        self.n_data = data_nodes
        self.network = InProcessNetwork()
        self.membership_store = InMemoryMembership.shared_store()
        self.emulator, self.regions = emulator, regions or {}
        self.data = load_data(cfg.data, self.spec.model.seq_len)
        self.relays: dict[str, RelayNode] = {}
        self.data_nodes: list[DataNode] = []
        self._counter = 0
        crashes = [f for f in faults or [] if isinstance(f, Fault)]
        messages = [f for f in faults or [] if isinstance(f, MessageFault)]
        self.faults = FaultInjector(crashes, on_crash=self.crash, messages=messages)

    def _transport(self, name: str) -> InProcessTransport:
        return InProcessTransport(self.network, name, self.run_id, self.regions.get(name), self.emulator)

    def _options(self, name: str) -> NodeOptions:
        return NodeOptions(capacity=self.capacity, region=self.regions.get(name))

    def _membership(self, peer_id: str) -> InMemoryMembership:
        return InMemoryMembership(self.membership_store, self.run_id, peer_id)

    async def add_relay(self, stage: int) -> RelayNode:
        self._counter += 1
        name = f"relay-s{stage}-{self._counter}"
        opts = self._options(name)
        node = RelayNode(self.spec, self._transport(name), self._membership(name), opts, stage)
        node.faults = self.faults
        self.relays[name] = node
        await node.start(module_builder(self.spec))
        return node

    async def start(self) -> None:
        for stage, count in enumerate(self.replicas, start=1):
            for _ in range(count):
                await self.add_relay(stage)
        for rank in range(self.n_data):
            name = f"data-{rank}"
            node = make_data_node(
                self.spec, self._transport(name), self._membership(name), self._options(name), rank, self.data
            )
            node.faults = self.faults
            self.data_nodes.append(node)
        await asyncio.gather(*(d.start(expected_data_nodes=self.n_data, timeout=30) for d in self.data_nodes))

    async def step(self) -> StepResult:
        reports = await asyncio.gather(*(d.run_iteration() for d in self.data_nodes))
        losses = [loss for r in reports for loss in r.losses]
        return StepResult(reports[0].iteration, sum(losses) / max(len(losses), 1), list(reports))

    async def crash(self, peer_id: str) -> None:
        """The peer vanishes at once: calls to it fail, its record stops being refreshed and expires."""
        self.network.crash(peer_id)
        node = self.relays.pop(peer_id, None)
        if node is not None:
            await node.close()

    async def close(self) -> None:
        for node in [*self.relays.values(), *self.data_nodes]:
            await node.close()


class StubNode:
    """What a router or the stage-0 copy uses of its node (gwtf.routing.base.RoutedNode) and nothing more: a real
    in-process transport, the run's settings that AgentService reads, and the DHT records as a dict the test edits."""

    def __init__(self, network: InProcessNetwork, peer_id: str, records: dict, n_stages: int,
                 run_id: str = "stub-run", call_timeout: float = 2.0) -> None:  # fmt: skip
        self.transport = InProcessTransport(network, peer_id, run_id)
        self.peer_id, self.run_id, self.call_timeout = peer_id, run_id, call_timeout
        self.spec = SimpleNamespace(model=SimpleNamespace(n_stages=n_stages))
        settings = {"transport": SimpleNamespace(call_timeout=call_timeout),
                    "membership": SimpleNamespace(heartbeat_s=0.02)}  # fmt: skip
        self.run = SimpleNamespace(**settings)
        self.records = records
        self.closed = False

    async def call(self, peer, name, msg, timeout=None):
        return await self.transport.call(peer, name, msg, timeout=timeout or self.call_timeout)

    def message(self, kind, **kw):
        return Message(kind=kind, run_id=self.run_id, **kw)

    async def live_nodes(self, max_age=None):
        return dict(self.records)
