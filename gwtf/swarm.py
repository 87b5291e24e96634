"""Assembling a swarm from a run config: what every node builds, and a whole swarm in one process.

`InProcessSwarm` runs relays and data nodes as asyncio peers of one event loop over the in-process transport and
in-memory membership: the same node code as a real swarm, deterministic and fast, for tests. Processes on
hivemind are assembled in `launch/` from the same pieces (`run_spec`, `module_builder`, `view_builder`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from gwtf.config import RunConfig
from gwtf.data import MicrobatchSchedule, PackedData, load_data
from gwtf.datanode import DataNode, IterationReport
from gwtf.faults import Fault, FaultInjector, MessageFault
from gwtf.membership import InMemoryMembership, NodeRecord
from gwtf.node import RelayNode, RunSpec, SwarmConfig, serving
from gwtf.routing.base import DataInfo, RelayInfo, SwarmView, make_router
from gwtf.transport import InProcessNetwork, InProcessTransport, LinkEmulator

log = logging.getLogger(__name__)


def run_spec(run_id: str, cfg: RunConfig, data_nodes: int = 1) -> RunSpec:
    t = cfg.train
    return RunSpec(
        run_id, cfg.model_config(), cfg.optim, t.steps, t.seed, data_nodes, cfg.pretrained, t.microbatch_size
    )


def module_builder(spec: RunSpec) -> Callable[[int], nn.Module]:
    """Stage k from the run's pretrained checkpoint (checked against its hash) when the run fine-tunes one and this
    machine has it, else from the run's seed alone, so every first replica of a stage starts from the same weights
    (a replica without the checkpoint downloads the stage from a live replica)."""
    from gwtf.models.checkpoint import load_stage
    from gwtf.models.staged import build_stage

    def build(k: int) -> nn.Module:
        if spec.pretrained and Path(spec.pretrained).is_dir():
            return load_stage(spec.pretrained, k)[1]
        return build_stage(spec.model, k, spec.seed)

    return build


def activation_bytes(model, microbatch_size: int) -> int:
    """Bytes of one microbatch's activations between stages (fp32 hidden states): the routers' `size`."""
    return microbatch_size * model.seq_len * model.d_model * 4


def view_builder(spec: RunSpec, microbatch_size: int) -> Callable[[dict[str, NodeRecord], int | None], SwarmView]:
    """Turn live membership records into what a router needs; only serving nodes at the iteration's version
    carry traffic (a replica that is behind catches up first). Iteration None: every serving node."""
    m = spec.model
    size = activation_bytes(m, microbatch_size)

    def build(nodes: dict[str, NodeRecord], iteration: int | None) -> SwarmView:
        relays = {
            p: RelayInfo(p, r.stage, r.capacity, max(r.compute_s, 1e-4), r.region)
            for p, r in serving(nodes, "relay").items()
            if iteration is None or r.state_version == iteration
        }
        data = {p: DataInfo(p, r.region) for p, r in serving(nodes, "data").items()}
        return SwarmView(m.n_stages, relays, data, size)

    return build


def make_schedule(cfg: RunConfig, data: PackedData, n_data_nodes: int) -> MicrobatchSchedule:
    t = cfg.train
    return MicrobatchSchedule(data.train, t.microbatch_size, t.microbatches_per_step, n_data_nodes, t.seed)


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
        swarm: SwarmConfig | None = None,
        run_id: str = "inproc",
        emulator: LinkEmulator | None = None,
        regions: dict[str, str] | None = None,
        faults: list[Fault | MessageFault] | None = None,
    ):
        self.cfg, self.run_id = cfg, run_id
        self.spec = run_spec(run_id, cfg, data_nodes)
        n = self.spec.model.n_stages
        self.replicas = [replicas] * n if isinstance(replicas, int) else list(replicas)
        if len(self.replicas) != n:
            raise ValueError(f"replicas per stage: need {n} entries, got {len(self.replicas)}")
        self.n_data = data_nodes
        self.swarm_cfg = swarm or SwarmConfig(heartbeat_s=0.2, record_ttl_s=1.0)
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

    def _membership(self, peer_id: str) -> InMemoryMembership:
        return InMemoryMembership(self.membership_store, self.run_id, peer_id)

    async def add_relay(self, stage: int) -> RelayNode:
        self._counter += 1
        name = f"relay-s{stage}-{self._counter}"
        cfg = SwarmConfig(**{**self.swarm_cfg.__dict__, "region": self.regions.get(name)})
        node = RelayNode(self.spec, self._transport(name), self._membership(name), cfg, stage)
        node.faults = self.faults
        self.relays[name] = node
        await node.start(module_builder(self.spec))
        return node

    async def start(self) -> None:
        for stage, count in enumerate(self.replicas, start=1):
            for _ in range(count):
                await self.add_relay(stage)
        schedule = make_schedule(self.cfg, self.data, self.n_data)
        views = view_builder(self.spec, self.cfg.train.microbatch_size)
        for rank in range(self.n_data):
            name = f"data-{rank}"
            cfg = SwarmConfig(**{**self.swarm_cfg.__dict__, "region": self.regions.get(name)})
            node = DataNode(
                self.spec,
                self._transport(name),
                self._membership(name),
                cfg,
                rank,
                schedule,
                make_router(cfg.router, self.spec.seed),
                module_builder(self.spec),
                views,
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
