"""Node lifecycle and the relay node: join, stage choice, state download, serving forward and backward.

A node is an asyncio program over a `Transport` (in-process or hivemind) and a `Membership` (in-memory or DHT).
Compute runs on one worker thread per node, so the event loop keeps answering calls and heartbeats while a
stage computes, and a node's gradient accumulation never races with itself.

Relay protocol (all calls ack on receipt; the work runs after the ack):
    forward      input activation of microbatch (origin, id, attempt) with its route; compute, pass it on
    backward     gradient of this stage's output; backward, pass the input gradient to the previous hop
    recompute    input activation + output gradient, for a microbatch whose replica died after its forward
    resend       "your output of this microbatch, please, to this new replica, with this gradient"
    regrad       "the replica before you died during its backward: recover it with the gradient you sent it"
    release      "this microbatch was restarted: drop what you hold of its earlier attempts"
    end_iteration  a data node is done with iteration i; once all live data nodes are, average and step
    get_state    parameters + optimizer state, for a joiner (or a shadow holder: `min_version` waits, bounded,
                 until this replica has stepped that far)
    get_shadow   the state of the neighbouring stage this relay shadows (recovery="redundant"), for the joiner
                 that takes over that stage when it lost every replica

Redundant computation (recovery="redundant", Bamboo's baseline): the relays of stage k-1 each hold a `Shadow` of
stage k (stage 1's shadow is held by stage 2: its predecessor would be the data nodes, which are out of scope
here). After every step a holder fetches the new state of the stage it shadows from one live replica of it, in
the background, and on every microbatch it forwards it also runs that stage's forward on its own output (the
stage-1 shadow on stage 2 has no input there: it costs only the compute delay the churn harness emulates). A
joiner for a stage with no live replica then takes the shadow over exactly: weights, optimizer moments, version.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gwtf.averaging import GroupAverager
from gwtf.errors import BadMessage, PeerError, UserError
from gwtf.faults import FaultInjector
from gwtf.membership import Membership, NodeRecord
from gwtf.optim import OptimConfig
from gwtf.routing.p2p import AgentService
from gwtf.stage import STATE_CHUNK, Key, StageReplica, state_subset
from gwtf.transport import Message, Transport

log = logging.getLogger(__name__)


@dataclass
class SwarmConfig:
    """Timing and capacity settings of a node (every wait on a peer is bounded by one of these)."""

    capacity: int = 4  # microbatches a relay holds at once
    call_timeout: float = 10.0  # one call to a peer
    microbatch_timeout: float = 30.0  # a microbatch's forward or backward leg, end to end
    iteration_timeout: float = 60.0  # waiting for the other data nodes at an iteration's end
    average_timeout: float = 10.0
    heartbeat_s: float = 1.0
    record_ttl_s: float = 8.0  # a loaded DHT can miss a few beats; calls that fail detect crashes sooner
    max_attempts: int = 3  # restarts of one microbatch
    router: str = "round-robin"
    recovery: str = "checkfree"  # how a stage with no live replica is rebuilt (gwtf.recovery.make_strategy)
    stage_recovery_timeout: float = 120.0  # how long data nodes wait for a lost stage to be rebuilt
    region: str | None = None
    route_round_s: float = 0.1  # router "gwtf-p2p": seconds between two routing rounds of a node's agent

    def __post_init__(self) -> None:
        if self.route_round_s <= 0:
            raise UserError(f"route_round_s must be positive, got {self.route_round_s}")
        if self.capacity < 1:
            raise UserError(f"capacity must be >= 1, got {self.capacity}")
        check_live_recovery(self.recovery)
        if self.record_ttl_s <= self.heartbeat_s:
            raise UserError("record_ttl_s must exceed heartbeat_s, or live nodes would look dead between heartbeats")


LIVE_RECOVERY = ("checkfree", "checkfree+", "copy", "random", "redundant")  # SwarmConfig.recovery


def check_live_recovery(name: str) -> None:
    """UserError unless a live swarm can rebuild a lost stage with strategy `name` (gwtf.recovery has one more,
    `checkpoint`, for the one-process simulation only: a swarm of volunteers has no checkpoint store here)."""
    if name == "checkpoint":
        raise UserError(
            "recovery='checkpoint' is not a live swarm mode (no volunteer stores checkpoints here); checkpoint restart "
            "is measured as DeepSpeed's (`python -m gwtf.benchmarks.churn ... --compare system=gwtf,deepspeed`) and "
            "simulated by `python -m gwtf.benchmarks.recovery --strategies checkpoint`"
        )
    if name not in LIVE_RECOVERY:
        raise UserError(f"unknown recovery {name!r}; a live swarm rebuilds a lost stage with one of {LIVE_RECOVERY}")


@dataclass
class RunSpec:
    """What every node of a run agrees on (from the run record)."""

    run_id: str
    model: Any  # models.presets.ModelConfig
    optim: OptimConfig
    total_steps: int
    seed: int
    data_nodes: int = 1  # data nodes the run expects; fewer only when some have died
    pretrained: str | None = None  # staged checkpoint the first replicas load (fine-tuning); later ones download
    microbatch_size: int = 1  # sequences per microbatch (the routers' activation size)


async def fetch_state(call, run_id: str, donors: list[str], names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """A stage's parameters and optimizer state by name, in chunks spread over the donors, all at one version.
    `call(donor, message) -> reply` sends a get_state request."""
    chunks = [names[i : i + STATE_CHUNK] for i in range(0, len(names), STATE_CHUNK)]
    replies = await asyncio.gather(
        *(call(donors[i % len(donors)], Message(kind="state", run_id=run_id, meta={"names": chunk}))
          for i, chunk in enumerate(chunks))
    )  # fmt: skip
    versions = {r.meta["version"] for r in replies}
    if len(versions) != 1:
        raise BadMessage(f"donors are at different versions {sorted(versions)}")
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for r in replies:
        tensors.update(zip(r.meta["keys"], r.tensors))
        steps.update(r.meta["steps"])
    missing = [n for n in names if f"param/{n}" not in tensors]
    if missing:
        raise BadMessage(f"the donors' state lacks {len(missing)} parameters, e.g. {missing[0]}")
    first = replies[0].meta
    meta = {"version": versions.pop(), "steps": steps, "lr_scale": first.get("lr_scale", 1.0),
            "grad_norm": first.get("grad_norm")}  # fmt: skip
    return tensors, meta


class NodeBase:
    """Transport, membership record and heartbeat, the compute thread, and bounded peer calls."""

    role = "node"

    def __init__(self, spec: RunSpec, transport: Transport, membership: Membership, cfg: SwarmConfig):
        self.spec, self.transport, self.membership, self.cfg = spec, transport, membership, cfg
        self.peer_id = transport.peer_id
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{self.peer_id[:6]}")
        self.status = "joining"
        self.started = time.time()
        self.closed = False
        self._view: tuple[float, dict[str, NodeRecord]] | None = None
        self.faults: FaultInjector | None = None
        self.run_version = 0
        self.routing: AgentService | None = None  # router gwtf-p2p: this node's routing agent (start_routing)

    async def fault(self, phase: str, iteration: int) -> None:
        """A point where an injected fault may strike (gwtf.faults)."""
        if self.faults is not None:
            await self.faults.hit(self.peer_id, phase, iteration)

    # ---- helpers -----------------------------------------------------------------------------------------------
    async def compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def call(self, peer: str, name: str, msg: Message, timeout: float | None = None) -> Message:
        if self.faults is not None:
            msg = await self.faults.on_send(self.peer_id, name, msg)
        return await self.transport.call(peer, name, msg, timeout=timeout or self.cfg.call_timeout)

    def message(self, kind: str, **kw) -> Message:
        return Message(kind=kind, run_id=self.spec.run_id, **kw)

    def record(self) -> NodeRecord:
        raise NotImplementedError

    async def live_nodes(self, max_age: float | None = None) -> dict[str, NodeRecord]:
        """The live records, cached for `max_age` seconds (default: a heartbeat, as records change no faster):
        many waits poll it, and a DHT read costs every peer's DHT process CPU (it checks every record's signature)."""
        now = time.monotonic()
        if max_age is None:
            max_age = self.cfg.heartbeat_s
        if self._view is None or now - self._view[0] > max_age:
            self._view = (now, await asyncio.to_thread(self.membership.live_nodes))
        return self._view[1]

    async def fresh_versions(self, nodes: dict[str, NodeRecord]) -> dict[str, NodeRecord]:
        """`nodes` with the state versions the serving data nodes know first hand where those are newer (records are
        written once a heartbeat and lag up to a step behind); best effort, each call bounded."""
        others = sorted(p for p in serving(nodes, "data") if p != self.peer_id)
        msg = self.message("versions")
        calls = [self.call(p, "versions", msg, timeout=self.cfg.call_timeout) for p in others]
        nodes = dict(nodes)
        for peer, reply in zip(others, await asyncio.gather(*calls, return_exceptions=True)):
            versions = reply.meta.get("versions") if isinstance(reply, Message) else None
            if not isinstance(versions, dict):
                log.info("%s: no versions from data node %s (%s)", self.peer_id[:8], peer[:8], reply)
                continue
            for p, v in versions.items():
                if p in nodes and type(v) is int and v > nodes[p].state_version:
                    nodes[p] = dataclasses.replace(nodes[p], state_version=v)
        return nodes

    async def announce(self) -> None:
        """Write this node's record now; a failed write is logged, the heartbeat writes it again soon."""
        try:
            await asyncio.to_thread(self.membership.announce, self.record(), self.cfg.record_ttl_s)
        except Exception as exc:  # the DHT refusing one store must not fail an iteration
            log.warning("%s: announcing its record failed (%s); the heartbeat retries", self.peer_id[:8], exc)

    def start_heartbeat(self) -> None:
        cfg = self.cfg
        self.membership.start_heartbeat(self.record, cfg.heartbeat_s, cfg.record_ttl_s)

    async def start_routing(self, stage: int, views, units: int = 0) -> AgentService:
        """Router gwtf-p2p: this node's own GWTF agent (gwtf.routing.p2p), in rounds until the node closes.
        `views(records)`: the swarm of every serving node; `units`: a data node's microbatches per iteration."""
        n = self.spec.model.n_stages
        self.routing = AgentService(self, stage, n, views, round_s=self.cfg.route_round_s, seed=self.spec.seed)
        await self.routing.start(units)
        return self.routing

    async def close(self) -> None:
        # Nothing is awaited before the record stops being refreshed: a relay that crashes closes from one of its
        # own tasks, which close() cancels, so the first await may be the last thing it runs.
        self.closed = True
        self.membership.close()
        if self.routing is not None:
            await self.routing.close()
        await self.transport.shutdown()
        self.executor.shutdown(wait=False, cancel_futures=True)


IDLE_BEFORE_VERSION_CHECK_S = 3.0  # a replica routed through more recently is not behind (see _watch_version)


def _timed(fn, *args) -> tuple[Any, float]:
    """fn(*args) and the seconds it took, measured where it runs (in the compute thread)."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _peers_of(by_stage: Any, stage: int) -> set[str]:
    """The peer ids listed for `stage` in a {stage: [peer, ...]} map from a message (anything malformed: none)."""
    peers = by_stage.get(str(stage), []) if isinstance(by_stage, dict) else []
    return {p for p in peers if isinstance(p, str)} if isinstance(peers, list) else set()


def serving(nodes: dict[str, NodeRecord], role: str, stage: int | None = None) -> dict[str, NodeRecord]:
    return {
        p: r
        for p, r in nodes.items()
        if r.role == role and r.status == "serving" and (stage is None or r.stage == stage)
    }


# ---------------------------------------------------------------------------------------------------------------
# redundant computation (Bamboo): shadows of the neighbouring stage


def shadow_holder_stage(stage: int, n_stages: int) -> int | None:
    """The relay stage whose relays hold stage `stage`'s shadow under recovery="redundant": the stage before it
    (Bamboo); stage 1's predecessor is the data nodes, which hold no shadows here, so stage 2 holds stage 1's.
    None with a single relay stage (nobody to hold it)."""
    if n_stages < 2 or not 1 <= stage <= n_stages:
        return None
    return stage - 1 if stage >= 2 else 2


def shadowed_stages(stage: int, n_stages: int) -> list[int]:
    """The stages whose shadows a relay of `stage` holds (the inverse of `shadow_holder_stage`)."""
    return [k for k in range(1, n_stages + 1) if k != stage and shadow_holder_stage(k, n_stages) == stage]


class Shadow:
    """A relay's copy of a neighbouring stage: weights, optimizer moments and version (a `StageReplica` that never
    trains), brought up to each new version by fetching it, and run forward on every microbatch the holder
    forwards. `fed`: whether the holder has this stage's input (it is the stage just before it); stage 1's shadow,
    held by stage 2, is not fed: its forward computes nothing here (only the churn harness's emulated delay, which
    patches `Shadow.forward`, charges it). Its state and forward are touched on the holder's compute thread only."""

    def __init__(self, replica: StageReplica, fed: bool):
        self.replica, self.fed = replica, fed
        self.fetched_bytes = 0  # state received to keep it in step
        self.forwards = 0  # redundant forwards run
        self.forward_s = 0.0  # their time (real compute plus any emulated delay)
        self.refreshing: asyncio.Task | None = None  # at most one fetch in flight

    @property
    def stage(self) -> int:
        return self.replica.index

    @property
    def version(self) -> int:
        return self.replica.version

    def forward(self, hidden: torch.Tensor | None) -> None:
        """The redundant forward; its output is discarded (no graph, no gradient: training is unchanged)."""
        if hidden is not None:
            with torch.no_grad():
                self.replica.module(hidden)

    def timed_forward(self, hidden: torch.Tensor | None) -> None:
        _, took = _timed(self.forward, hidden if self.fed else None)
        self.forward_s += took
        self.forwards += 1


def redundancy_cost(shadows: dict[int, Shadow]) -> str:
    """One log line with a relay's running totals (the churn harness reads the last one from each relay's log)."""
    fetched = sum(s.fetched_bytes for s in shadows.values())
    seconds, forwards = sum(s.forward_s for s in shadows.values()), sum(s.forwards for s in shadows.values())
    return f"redundant cost: shadow_bytes={fetched} redundant_forward_s={seconds:.4f} redundant_forwards={forwards}"


class RelayNode(NodeBase):
    """Serves one stage: forward, backward, recompute; averages with its stage's replicas at each iteration end."""

    role = "relay"

    def __init__(self, spec: RunSpec, transport: Transport, membership: Membership, cfg: SwarmConfig, stage: int):
        super().__init__(spec, transport, membership, cfg)
        if not 1 <= stage <= spec.model.n_stages:
            raise UserError(f"stage must be in 1..{spec.model.n_stages}, got {stage}")
        self.stage = stage
        self.replica: StageReplica | None = None
        self.compute_s = 0.0
        self.iteration_done: dict[int, set[str]] = {}
        self.iteration_used: dict[int, set[str]] = {}  # replicas of this stage the data nodes routed through
        self.iteration_group: dict[int, set[str]] = {}  # replicas of this stage the data nodes told to step
        self.iteration_steps: dict[int, asyncio.Future] = {}
        self.averager = GroupAverager(transport, spec.run_id, f"stage{stage}", timeout=cfg.average_timeout)
        self.tasks: set[asyncio.Task] = set()
        self.catching_up: asyncio.Future | None = None
        self.watchdog: asyncio.Future | None = None  # _watch_version, once serving
        self.routed_at = 0.0  # when a microbatch at this replica's version last came in
        self.incoming: set[Key] = set()  # forwards acknowledged, not computed yet (they count against capacity)
        self.sent_grads: dict[Key, tuple[torch.Tensor, list[str]]] = {}  # until the iteration ends, for regrad
        self.shadows: dict[int, Shadow] = {}  # recovery="redundant": the neighbouring stage(s) this relay shadows
        self.rebuilt_source = ""  # how this replica's stage was rebuilt, if it was ("mean(1,3)", "shadow@stage 1 v4")
        for name, fn in {
            "regrad": self.rpc_regrad,
            "release": self.rpc_release,
            "forward": self.rpc_forward,
            "backward": self.rpc_backward,
            "recompute": self.rpc_recompute,
            "resend": self.rpc_resend,
            "end_iteration": self.rpc_end_iteration,
            "advance": self.rpc_advance,
            "get_state": self.rpc_get_state,
            "get_shadow": self.rpc_get_shadow,
        }.items():
            transport.add_handler(name, fn, validator=functools.partial(self.validate, handler=name))

    def record(self) -> NodeRecord:
        r = self.replica
        return NodeRecord(
            peer_id=self.peer_id,
            role="relay",
            stage=self.stage,
            status=self.status,
            capacity=self.cfg.capacity,
            compute_s=self.compute_s,
            region=self.cfg.region,
            state_version=r.version if r else -1,
            holds_weights=r is not None,
            grad_norm=r.last_grad_norm if r else None,
            throughput=(r.stats.backward / max(time.time() - self.started, 1e-6)) if r else 0.0,
            microbatches_done=r.stats.backward if r else 0,
            maddrs=[],
            room=self.routing.room() if self.routing is not None else -1,
        )

    # ---- joining -----------------------------------------------------------------------------------------------
    async def start(self, build_module, timeout: float = 60.0) -> None:
        """Announce, take the stage's state (from live replicas, or from the seed at a run's start), serve."""
        await self.announce()
        nodes = await self.fresh_versions(await self.live_nodes(max_age=0))
        self.run_version = max((r.state_version for r in nodes.values()), default=0)  # for fault points
        await self.fault("joining", self.run_version)
        module = await self.compute(build_module, self.stage)
        self.replica = StageReplica(self.stage, module, self.spec.optim, self.spec.total_steps, self.cfg.capacity)
        # Download from the replicas at the stage's newest version only: one left behind (it joined as a step ended
        # and was never routed through since) would hand a stale state on to every later joiner.
        have = {p: r.state_version for p, r in serving(nodes, "relay", self.stage).items() if r.state_version > 0}
        newest = max(have.values(), default=0)
        donors = sorted(p for p, v in have.items() if v == newest)
        # At version 0 every replica of a stage holds what `build_module` gives (the seed's or the checkpoint's
        # weights, no optimizer state yet): nothing to download.
        downloaded = bool(donors) and await self.download_state(donors, timeout)
        if not downloaded and self.spec.pretrained and not Path(self.spec.pretrained).is_dir():
            raise UserError(
                f"stage {self.stage} has no live replica to download from and the run's checkpoint "
                f"{self.spec.pretrained} is not on this machine: copy it there, or join once a replica serves"
            )
        if not downloaded and self.run_version > 0:  # the run is under way and this stage has no live replica left
            await self.rebuild_stage(build_module)
        if self.cfg.recovery == "redundant":
            await self._make_shadows(build_module)
        self.status = "serving"
        await self.announce()
        self.start_heartbeat()
        self.watchdog = asyncio.ensure_future(self._watch_version())
        if self.cfg.router == "gwtf-p2p":
            from gwtf.swarm import view_builder  # gwtf.swarm assembles nodes: imported here, not at the top

            views = view_builder(self.spec, self.spec.microbatch_size)
            await self.start_routing(self.stage, lambda records: views(records, None))
            await self.announce()  # its room, for the other agents' directory
        await self._tell_data_nodes(nodes)
        log.info("relay %s serving stage %d at version %d", self.peer_id[:8], self.stage, self.replica.version)

    async def _tell_data_nodes(self, nodes: dict[str, NodeRecord]) -> None:
        """Data nodes read the DHT about once a heartbeat: tell them this replica serves now (best effort, bounded),
        so that it takes part in the current iteration's step instead of falling behind by one."""
        msg = self.message("relay_serving", meta={"stage": self.stage})
        calls = [self.call(p, "relay_serving", msg, timeout=self.cfg.call_timeout) for p in serving(nodes, "data")]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, Exception):
                log.info("relay %s: telling a data node it serves failed (%s)", self.peer_id[:8], result)

    async def download_state(self, donors: list[str], timeout: float) -> bool:
        """Fetch parameters and optimizer state, parameter names spread over the donors (one version for all).
        False when no live donor is left (the stage is lost: the caller rebuilds it)."""
        assert self.replica is not None
        names = [n for n, _ in self.replica.module.named_parameters()]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                await self.fault("state_download", self.run_version)
                tensors, meta = await self._fetch_from(donors, names)
                await self.compute(self.replica.load_state, tensors, meta)
                log.info(
                    "relay %s downloaded stage %d v%d from %d donor(s)",
                    self.peer_id[:8],
                    self.stage,
                    meta["version"],
                    len(donors),
                )
                return True
            except (PeerError, BadMessage) as exc:
                log.warning("state download failed (%s); retrying with the live donors", exc)
                await asyncio.sleep(0.2)
                donors = sorted(serving(await self.live_nodes(max_age=0), "relay", self.stage))
                if not donors:
                    return False
        raise PeerError(f"could not download stage {self.stage} within {timeout:.0f}s")

    async def rebuild_stage(self, build_module) -> None:
        """Rebuild this stage from its live neighbours with the run's strategy (CheckFree: their gradient-norm
        weighted average; an edge stage copies its one relay neighbour), fresh optimizer, raised learning rate.
        Under "redundant" a live shadow holder's copy is taken over exactly instead, and only where none is left
        (or it is too old) is a neighbour copied, as gwtf.recovery.RedundantRecovery does."""
        from gwtf.optim import make_optimizer
        from gwtf.recovery import CopyNeighbour, RedundantRecovery, install, make_strategy

        assert self.replica is not None
        strategy = make_strategy(self.cfg.recovery)
        strategy.check(self.spec.model)
        suffix = ""
        if isinstance(strategy, RedundantRecovery):
            if await self._take_over_shadow():
                return
            strategy, suffix = CopyNeighbour(), " (shadow lost)"
            strategy.check(self.spec.model)
        nodes = await self.live_nodes(max_age=0)
        modules, norms, versions = {}, {}, []
        for j in (self.stage - 1, self.stage + 1):
            donors = sorted(serving(nodes, "relay", j)) if 1 <= j <= self.spec.model.n_stages else []
            if donors:
                modules[j], version, norms[j] = await self._neighbour(j, donors[0], build_module)
                versions.append(version)
        rebuilt = await self.compute(strategy.rebuild, self.stage, modules, norms, self.spec.model, self.spec.seed)
        rebuilt.source += suffix
        r = self.replica
        r.optimizer = install(rebuilt, r.module, r.optimizer, lambda m: make_optimizer(m, self.spec.optim))
        r.version = max(versions, default=self.run_version)
        r.boost, r.boost_from, r.lr_scale = rebuilt, r.version, rebuilt.lr_scale
        self.rebuilt_source = rebuilt.source
        log.warning(
            "relay %s rebuilt lost stage %d at v%d: %s (lr x%.2f)",
            self.peer_id[:8],
            self.stage,
            r.version,
            rebuilt.source,
            rebuilt.lr_scale,
        )

    async def _take_over_shadow(self) -> bool:
        """Load this stage's state from the live shadow holder with the newest shadow (exact: weights, optimizer
        moments, version; no learning-rate boost). False, with a warning that says why, where no live holder has
        one at most a step older than the run (the shadow died with its holder): the caller copies a neighbour."""
        assert self.replica is not None
        holder_stage = shadow_holder_stage(self.stage, self.spec.model.n_stages)
        holders = sorted(serving(await self.live_nodes(max_age=0), "relay", holder_stage)) if holder_stage else []
        probe = self.message("get_shadow", meta={"stage": self.stage, "version_only": True})
        replies = await asyncio.gather(*(self.call(h, "get_shadow", probe) for h in holders), return_exceptions=True)
        versions = {}
        for holder, reply in zip(holders, replies):
            if isinstance(reply, Message) and type(reply.meta.get("version")) is int:
                versions[holder] = reply.meta["version"]
            else:
                log.info("relay %s: no shadow of stage %d from %s (%s)", self.peer_id[:8], self.stage, holder[:8],
                         reply)  # fmt: skip
        usable = sorted((v, h) for h, v in versions.items() if v >= self.run_version - 1)
        names = [n for n, _ in self.replica.module.named_parameters()]
        for _, holder in reversed(usable):  # the newest first
            try:
                tensors, meta = await self._fetch_from([holder], names, "get_shadow", stage=self.stage)
                await self.compute(self.replica.load_state, tensors, meta)
            except (PeerError, BadMessage) as exc:
                log.warning("relay %s: taking over the shadow from %s failed (%s)", self.peer_id[:8], holder[:8], exc)
                continue
            self.replica.boost = None  # an exact takeover: the lost stage's own learning rate goes on
            self.rebuilt_source = f"shadow@stage {holder_stage} v{self.replica.version}"
            if self.replica.version < self.run_version:
                # The stage died in the step after the shadow's version, before its holders fetched the new state:
                # that one update is lost. Take the run's version without it at once, as a data node would have
                # this stage do after a grace (rpc_advance), and as a CheckFree rebuild takes its neighbours'.
                await self.compute(self.replica.skip_step, self.run_version)
                self.rebuilt_source += f", v{self.run_version} without that step's update"
            log.warning("relay %s rebuilt lost stage %d at v%d: %s (from %s)", self.peer_id[:8], self.stage,
                        self.replica.version, self.rebuilt_source, holder[:8])  # fmt: skip
            return True
        why = (
            f"its shadows are at {sorted(set(versions.values()))}, over a step behind the run's v{self.run_version}"
            if versions
            else f"no live relay of stage {holder_stage} holds one (the shadow died with them)"
        )
        log.warning("redundant: no usable shadow of lost stage %d: %s; falling back to copying a neighbour "
                    "(copy (shadow lost))", self.stage, why)  # fmt: skip
        return False

    async def _neighbour(self, stage: int, donor: str, build_module) -> tuple[Any, int, float]:
        """Stage `stage`'s current parameters from one of its replicas, as a module, with their version and the
        gradient norm of its last step (from the same snapshot: a DHT record may lag behind)."""
        module = await self.compute(build_module, stage)
        tensors, meta = await self._fetch_from([donor], [n for n, _ in module.named_parameters()])
        module.load_state_dict({k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("param/")},
                               strict=False)  # fmt: skip
        return module, int(meta["version"]), float(meta.get("grad_norm") or 1.0)

    async def _fetch_from(
        self, donors: list[str], names: list[str], handler: str = "get_state", **meta: Any
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """A stage's state from `donors` through `handler` (get_state, or get_shadow with `stage`), `meta` added to
        each request."""

        async def get(donor: str, msg: Message) -> Message:
            msg.meta.update(meta)
            return await self.call(donor, handler, msg, timeout=self.cfg.iteration_timeout)

        return await fetch_state(get, self.spec.run_id, donors, names)

    async def _watch_version(self) -> None:
        """A replica catches up with the run by itself. Data nodes route only through replicas at the iteration's
        version, so one left a step behind (it announced itself as a step ended) is never sent the message that
        would tell it, and stays behind for good, a stale donor for every later joiner. Once a heartbeat it compares
        its version with the data nodes' records (written after their step, so after every used replica stepped);
        behind on two checks in a row and not stepping, it downloads the state."""
        behind_since: int | None = None
        while not self.closed:
            await asyncio.sleep(max(self.cfg.heartbeat_s, 0.05))
            if self.replica is None or self.catching_up is not None:
                continue
            if time.monotonic() - self.routed_at < IDLE_BEFORE_VERSION_CHECK_S:
                behind_since = None  # routed through at its version just now: not behind, and no DHT read
                continue
            try:
                nodes = await self.live_nodes()
            except Exception as exc:  # noqa: BLE001 (a watchdog must not die of a DHT hiccup; it tries again)
                log.debug("relay %s: version check failed (%s)", self.peer_id[:8], exc)
                continue
            run = max((r.state_version for r in serving(nodes, "data").values()), default=0)
            mine = self.replica.version
            stepping = (t := self.iteration_steps.get(mine)) is not None and not t.done()
            if run <= mine or stepping:
                behind_since = None
                continue
            if behind_since != mine:  # first sight: the data node's record can be a heartbeat ahead of our step
                behind_since = mine
                continue
            log.warning("relay %s: stage %d is at v%d, the run at v%d, and nobody routes through it: catching up",
                        self.peer_id[:8], self.stage, mine, run)  # fmt: skip
            self.catching_up = asyncio.ensure_future(self._catch_up(run))
            behind_since = None

    async def _catch_up(self, version: int) -> None:
        try:
            donors = [
                p
                for p, r in serving(await self.live_nodes(max_age=0), "relay", self.stage).items()
                if r.state_version >= version and p != self.peer_id
            ]
            if donors:
                log.info(
                    "relay %s is behind (v%d < v%d): downloading",
                    self.peer_id[:8],
                    self.replica.version if self.replica else -1,
                    version,
                )
                await self.download_state(sorted(donors), self.cfg.iteration_timeout)
                await self.announce()
                # As a joiner does: the data nodes re-read the DHT now and route through it from the next iteration,
                # instead of running steps without it until their cached view expires, which left it behind again.
                await self._tell_data_nodes(await self.live_nodes(max_age=0))
        finally:
            self.catching_up = None

    async def rpc_get_state(self, msg: Message) -> Message:
        if self.replica is None or self.status != "serving":
            raise BadMessage("this replica holds no state yet")
        want = msg.meta.get("min_version")
        deadline = time.monotonic() + self.cfg.call_timeout / 2
        while type(want) is int and self.replica.version < want and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # a shadow holder asks right after its own step: this one is stepping too
        await self.fault("state_donor", self.replica.version)
        tensors, meta = await self.compute(self.replica.state)
        part, meta = state_subset(tensors, meta, msg.meta.get("names"))
        return self.message("state", tensors=part, meta=meta)

    async def rpc_get_shadow(self, msg: Message) -> Message:
        """The shadow of stage `stage` this relay holds (recovery="redundant"), like get_state; with
        `version_only`, just its version."""
        stage = msg.meta["stage"]
        shadow = self.shadows.get(stage) if type(stage) is int else None
        if shadow is None or self.status != "serving":
            raise BadMessage(
                f"this relay of stage {self.stage} holds no shadow of stage {stage!r} "
                f"(it shadows {sorted(self.shadows) or 'none'}; recovery is {self.cfg.recovery!r})"
            )
        if msg.meta.get("version_only"):
            return self.message("shadow", meta={"stage": stage, "version": shadow.version})
        tensors, meta = await self.compute(shadow.replica.state)
        part, meta = state_subset(tensors, meta, msg.meta.get("names"))
        return self.message("state", tensors=part, meta=meta)

    # ---- shadows (recovery="redundant") ------------------------------------------------------------------------
    async def _make_shadows(self, build_module) -> None:
        """This relay's shadows of its neighbouring stage(s). Built from the seed (or the run's checkpoint) they
        are exact at version 0; a relay that joins a run under way fetches them at once."""
        assert self.replica is not None
        for k in shadowed_stages(self.stage, self.spec.model.n_stages):
            module = await self.compute(build_module, k)
            replica = StageReplica(k, module, self.spec.optim, self.spec.total_steps, capacity=1)
            self.shadows[k] = Shadow(replica, fed=k == self.stage + 1)
        if self.replica.version > 0:
            self._refresh_shadows(self.replica.version)

    def _refresh_shadows(self, version: int) -> None:
        """Start bringing every shadow up to `version`, in the background (never on a step's path)."""
        for shadow in self.shadows.values():
            if shadow.refreshing is not None and not shadow.refreshing.done():
                log.info("relay %s: shadow of stage %d still fetching v%d; v%d waits for the next step",
                         self.peer_id[:8], shadow.stage, shadow.version, version)  # fmt: skip
                continue
            shadow.refreshing = asyncio.ensure_future(self._refresh_shadow(shadow, version))
            shadow.refreshing.add_done_callback(self._task_done)

    async def _refresh_shadow(self, shadow: Shadow, version: int) -> None:
        """Fetch stage `shadow.stage`'s state at `version` or newer from one live replica of it (bounded in tries
        and time); a failure is logged and the next step tries again."""
        names = [n for n, _ in shadow.replica.module.named_parameters()]
        deadline = time.monotonic() + self.cfg.iteration_timeout
        for _ in range(2 * self.cfg.max_attempts):
            if self.closed or time.monotonic() > deadline:
                break
            donors = sorted(serving(await self.live_nodes(), "relay", shadow.stage))
            if not donors:
                log.warning("relay %s: no live replica of stage %d to bring its shadow to v%d (it stays at v%d)",
                            self.peer_id[:8], shadow.stage, version, shadow.version)  # fmt: skip
                return
            donor = donors[zlib.crc32(self.peer_id.encode()) % len(donors)]  # holders spread over the replicas
            try:
                tensors, meta = await self._fetch_from([donor], names, min_version=version)
            except (PeerError, BadMessage) as exc:
                log.info("relay %s: shadow fetch from %s failed (%s)", self.peer_id[:8], donor[:8], exc)
                await asyncio.sleep(0.2)
                continue
            shadow.fetched_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            if meta["version"] > shadow.version:
                await self.compute(shadow.replica.load_state, tensors, meta)
            if shadow.version >= version:
                log.info("relay %s: shadow of stage %d at v%d; %s", self.peer_id[:8], shadow.stage, shadow.version,
                         redundancy_cost(self.shadows))  # fmt: skip
                return
            await asyncio.sleep(0.1)  # that replica had not stepped yet
        log.warning("relay %s: shadow of stage %d not brought to v%d (it is at v%d); the next step tries again",
                    self.peer_id[:8], shadow.stage, version, shadow.version)  # fmt: skip

    async def _shadow_forwards(self, out: torch.Tensor) -> None:
        """Bamboo's cost: each shadow's forward on this microbatch (on the compute thread, like real work)."""
        for shadow in self.shadows.values():
            await self.compute(shadow.timed_forward, out)

    # ---- validation --------------------------------------------------------------------------------------------
    # meta fields each handler reads; a message without them is refused, not a KeyError inside the handler
    REQUIRED_META = {
        "forward": ("route", "order", "origin", "attempt"),
        "backward": ("route", "order", "origin", "attempt"),
        "recompute": ("route", "order", "origin", "attempt"),
        "regrad": ("route", "order", "origin", "attempt"),
        "resend": ("route", "order", "origin", "attempt"),
        "release": ("origin", "attempt"),
        "get_shadow": ("stage",),
    }

    def validate(self, msg: Message, handler: str) -> None:
        """By the handler called (the sender chooses `msg.kind`, not which checks apply): required fields, shape and
        dtype of activations and gradients against the model config, route sanity."""
        missing = [f for f in self.REQUIRED_META.get(handler, ()) if f not in msg.meta]
        if missing:
            raise BadMessage(f"{handler} needs meta field(s) {', '.join(missing)}")
        names = msg.meta.get("names") if handler in ("get_state", "get_shadow") else None
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise BadMessage(f"{handler}: names must be a list of parameter names")
        if handler in ("forward", "backward", "recompute"):
            m = self.spec.model
            for t in msg.tensors:
                if t.dim() != 3 or t.shape[1] > m.seq_len or t.shape[2] != m.d_model or t.dtype != torch.float32:
                    raise BadMessage(
                        f"expected float32 (batch, <= {m.seq_len}, {m.d_model}), got {t.dtype} {tuple(t.shape)}"
                    )
            route, order = msg.meta.get("route"), msg.meta.get("order")
            if not isinstance(route, list) or len(route) != m.n_stages or self.peer_id not in route:
                raise BadMessage(f"route does not pass through this replica of stage {self.stage}")
            if not isinstance(order, list) or sorted(order) != list(range(1, m.n_stages + 1)):
                raise BadMessage("order must visit every relay stage once")
            if order[route.index(self.peer_id)] != self.stage:
                raise BadMessage(f"route sends another stage's work to this replica of stage {self.stage}")
            n_expected = {"forward": 1, "backward": 1, "recompute": 2}[handler]
            if len(msg.tensors) != n_expected:
                raise BadMessage(f"{handler} carries {n_expected} tensor(s), got {len(msg.tensors)}")

    def _pos(self, msg: Message) -> int:
        """This replica's position in the microbatch's visit order (CheckFree+ swaps stages on some microbatches)."""
        return list(msg.meta["route"]).index(self.peer_id)

    def _key(self, msg: Message) -> Key:
        return (str(msg.meta["origin"]), msg.microbatch_id, int(msg.meta.get("attempt", 0)))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("relay %s: %s", self.peer_id[:8], task.exception())

    def _check_iteration(self, msg: Message) -> None:
        assert self.replica is not None
        if msg.iteration > self.replica.version and self.catching_up is None:
            # The swarm stepped without this replica (it joined mid-iteration, or missed an end): fetch the state.
            self.catching_up = asyncio.ensure_future(self._catch_up(msg.iteration))
        if msg.iteration != self.replica.version:
            raise BadMessage(f"iteration {msg.iteration} but this replica is at version {self.replica.version}")
        self.routed_at = time.monotonic()
        key = self._key(msg)
        taken = {k for k in self.replica.held if k[:2] != key[:2]} | {k for k in self.incoming if k[:2] != key[:2]}
        if len(taken) >= self.replica.capacity:
            raise BadMessage(f"replica full ({self.replica.capacity} microbatches held or arriving)")

    # ---- forward / backward ------------------------------------------------------------------------------------
    async def rpc_forward(self, msg: Message) -> Message:
        if self.replica is None:
            raise BadMessage("not serving yet")
        self._check_iteration(msg)
        self.incoming.add(self._key(msg))  # counted against capacity until its forward has run (or failed)
        self._spawn(self._forward(msg))
        return self.message("ack")

    async def _forward(self, msg: Message) -> None:
        assert self.replica is not None
        key = self._key(msg)
        try:
            await self.fault("forward", msg.iteration)
            out, took = await self.compute(_timed, self.replica.forward, key, msg.tensors[0])
        finally:
            self.incoming.discard(key)
        # Timed inside the compute thread: the record's compute time is one forward's, not the wait behind the
        # others a relay holds (that made busy relays look slow to the routers and to joiners choosing a stage).
        self.compute_s = 0.8 * self.compute_s + 0.2 * took if self.compute_s else took
        if self.shadows:
            self._spawn(self._shadow_forwards(out))
        route, origin, pos = list(msg.meta["route"]), str(msg.meta["origin"]), self._pos(msg)
        if pos == len(route) - 1:
            await self._deliver(origin, "head", msg, out, route)
            return
        for _ in range(self.cfg.max_attempts):  # bounded: re-route around a dead next hop
            nxt = route[pos + 1]
            try:
                await self.call(nxt, "forward", self._relay_msg(msg, "forward", [out], route))
                return
            except PeerError as exc:
                log.info(
                    "forward mb %d: next hop %s failed (%s); asking %s for a new one",
                    msg.microbatch_id,
                    nxt[:8],
                    exc,
                    origin[:8],
                )
                try:
                    route = await self._reroute(origin, msg, pos + 1, nxt, route)
                except PeerError as why:  # the data node has no replica to offer (or is gone itself)
                    log.info("forward mb %d: no new next hop (%s)", msg.microbatch_id, why)
                    break
        # Tell the data node now: it would otherwise wait for this leg until its microbatch timeout (30 s).
        fail = self.message("fail", iteration=msg.iteration, microbatch_id=msg.microbatch_id,
                            meta={"attempt": msg.meta.get("attempt", 0)})  # fmt: skip
        with contextlib.suppress(PeerError):
            await self.call(origin, "fail", fail)
        raise PeerError(f"forward of microbatch {msg.microbatch_id} found no live next hop")

    async def _reroute(self, origin: str, msg: Message, pos: int, dead: str, route: list[str]) -> list[str]:
        await self.fault("routing", msg.iteration)
        req = self.message(
            "route",
            microbatch_id=msg.microbatch_id,
            iteration=msg.iteration,
            meta={"position": pos, "dead": dead, "attempt": msg.meta.get("attempt", 0)},
        )
        reply = await self.call(origin, "route", req)
        return list(reply.meta["route"])

    def _relay_msg(self, msg: Message, kind: str, tensors: list[torch.Tensor], route: list[str]) -> Message:
        meta = {"route": route, "order": msg.meta["order"], "origin": msg.meta["origin"],
                "attempt": msg.meta.get("attempt", 0)}  # fmt: skip
        return self.message(
            kind, iteration=msg.iteration, microbatch_id=msg.microbatch_id, stage=self.stage, tensors=tensors, meta=meta
        )

    async def _deliver(self, origin: str, name: str, msg: Message, tensor: torch.Tensor, route: list[str]) -> None:
        await self.call(origin, name, self._relay_msg(msg, name, [tensor], route))

    async def rpc_backward(self, msg: Message) -> Message:
        if self.replica is None:
            raise BadMessage("not serving yet")
        if self._key(msg) not in self.replica.held:
            raise BadMessage(f"no held forward for microbatch {msg.microbatch_id}")
        self._spawn(self._backward(msg, recompute=False))
        return self.message("ack")

    async def rpc_recompute(self, msg: Message) -> Message:
        if self.replica is None:
            raise BadMessage("not serving yet")
        if msg.iteration != self.replica.version:
            raise BadMessage(f"iteration {msg.iteration} but this replica is at version {self.replica.version}")
        self._spawn(self._backward(msg, recompute=True))
        return self.message("ack")

    async def _backward(self, msg: Message, recompute: bool) -> None:
        assert self.replica is not None
        key = self._key(msg)
        await self.fault("backward", msg.iteration)
        if recompute:
            grad_in = await self.compute(self.replica.recompute_backward, key, msg.tensors[0], msg.tensors[1])
        else:
            grad_in = await self.compute(self.replica.backward, key, msg.tensors[0])
        route, origin, pos = list(msg.meta["route"]), str(msg.meta["origin"]), self._pos(msg)
        self.sent_grads[key] = (grad_in, route)
        if pos == 0:
            await self._deliver(origin, "embed_grad", msg, grad_in, route)
            return
        prev = route[pos - 1]
        try:
            await self.call(prev, "backward", self._relay_msg(msg, "backward", [grad_in], route))
        except PeerError as exc:
            # The previous stage's replica died after its forward: its upstream resends the activation to a new
            # replica, which recomputes that one stage (design.md section 4). The data node coordinates it.
            log.info("backward mb %d: replica %s before this one failed (%s); recovering", msg.microbatch_id,
                     prev[:8], exc)  # fmt: skip
            req = self._relay_msg(msg, "recover", [grad_in], route)
            req.meta.update({"dead_pos": pos - 1, "dead": prev})
            await self.call(origin, "recover", req)

    async def rpc_release(self, msg: Message) -> Message:
        """A data node restarted a microbatch: what this replica holds of its earlier attempts is dead weight."""
        if self.replica is not None:
            origin, attempt = str(msg.meta["origin"]), int(msg.meta["attempt"])
            keys = [k for k in self.replica.held if k[0] == origin and k[1] == msg.microbatch_id and k[2] <= attempt]
            await self.compute(self.replica.drop, keys)
        return self.message("ack")

    async def rpc_regrad(self, msg: Message) -> Message:
        """The previous stage's replica died during its backward: recover it with the gradient sent to it."""
        sent = self.sent_grads.get(self._key(msg))
        if sent is None:
            raise BadMessage(f"no input gradient kept for microbatch {msg.microbatch_id}")
        grad_in, route = sent
        pos = route.index(self.peer_id)
        req = self._relay_msg(msg, "recover", [grad_in], route)
        req.meta.update({"dead_pos": pos - 1, "dead": route[pos - 1]})
        await self.call(str(msg.meta["origin"]), "recover", req)
        return self.message("ack")

    async def rpc_resend(self, msg: Message) -> Message:
        """Send this replica's held output of a microbatch to a new replica of the next stage, to recompute."""
        assert self.replica is not None
        held = self.replica.held.get(self._key(msg))
        if held is None:
            raise BadMessage(f"no held output for microbatch {msg.microbatch_id}")
        route = list(msg.meta["route"])
        fwd = self._relay_msg(msg, "recompute", [held.out.detach(), msg.tensors[0]], route)
        await self.call(route[route.index(self.peer_id) + 1], "recompute", fwd)
        return self.message("ack")

    # ---- iteration end -----------------------------------------------------------------------------------------
    async def rpc_end_iteration(self, msg: Message) -> Message:
        """Return once this replica has averaged with its stage and stepped (or the iteration timed out)."""
        assert self.replica is not None
        i = msg.iteration
        if i < self.replica.version:
            return self.message("stepped", meta={"version": self.replica.version})
        if i > self.replica.version:
            raise BadMessage(f"end of iteration {i} but this replica is at version {self.replica.version}")
        sender = (await self.live_nodes()).get(msg.sender) or (await self.live_nodes(max_age=0)).get(msg.sender)
        if sender is None or sender.role != "data":
            raise BadMessage("only a live data node ends an iteration")  # a relay cannot make a stage step early
        self.iteration_done.setdefault(i, set()).add(msg.sender)
        self.iteration_used.setdefault(i, set()).update(_peers_of(msg.meta.get("used"), self.stage))
        if "group" in msg.meta:
            self.iteration_group.setdefault(i, set()).update(_peers_of(msg.meta["group"], self.stage))
        if i not in self.iteration_steps:
            self.iteration_steps[i] = asyncio.ensure_future(self._finish_iteration(i))
        await asyncio.wait_for(asyncio.shield(self.iteration_steps[i]), timeout=self.cfg.iteration_timeout * 2)
        return self.message("stepped", meta={"version": self.replica.version})

    async def rpc_advance(self, msg: Message) -> Message:
        """A data node found this stage one step behind the run with no replica left at the run's version (the
        replicas that stepped died before anyone downloaded from them): take the run's version without that step's
        update (one lost optimizer step for one stage, instead of a swarm stalled on a stage nobody can serve).
        A live replica at the run's version, if there is one after all, is downloaded from instead."""
        assert self.replica is not None
        i = msg.iteration
        nodes = await self.live_nodes(max_age=0)  # one fresh read serves both checks below
        sender = nodes.get(msg.sender)
        if sender is None or sender.role != "data" or sender.status != "serving":
            raise BadMessage("only a live data node advances a stage")
        pending = self.iteration_steps.get(i - 1)
        if self.replica.version != i - 1 or (pending is not None and not pending.done()):
            return self.message("advanced", meta={"version": self.replica.version})  # stepping still: not stale
        donors = [p for p, r in serving(nodes, "relay", self.stage).items()
                  if r.state_version >= i and p != self.peer_id]  # fmt: skip
        if donors and self.catching_up is None:
            self.catching_up = asyncio.ensure_future(self._catch_up(i))
            await asyncio.wait_for(asyncio.shield(self.catching_up), timeout=self.cfg.iteration_timeout)
        if self.replica.version == i - 1:
            log.warning("relay %s: stage %d advances to v%d without that step's update (no replica at v%d is left)",
                        self.peer_id[:8], self.stage, i, i)  # fmt: skip
            await self.compute(self.replica.skip_step, i)
            self.iteration_done.pop(i - 1, None)
            await self.announce()
        return self.message("advanced", meta={"version": self.replica.version})

    async def _finish_iteration(self, i: int) -> None:
        assert self.replica is not None
        deadline = time.monotonic() + self.cfg.iteration_timeout
        while time.monotonic() < deadline:  # wait for the data nodes to be done with i (messages, not the DHT)
            await self.fault("waiting", i)
            done = self.iteration_done.get(i, set())
            if len(done) >= self.spec.data_nodes:
                break
            # Fewer than expected so far: go on only once every data node the DHT still shows alive is done.
            if done and set(serving(await self.live_nodes(max_age=1.0), "data")) <= done:
                break
            await asyncio.sleep(0.02)
        await self._drain_tasks()
        group = await self._group(i)
        await self.fault("averaging", i)
        result = await self.averager.average(i, self.replica.grad_tensors(), self.replica.count, sorted(group))
        await self.fault("optimizer_step", i)
        await self.compute(self.replica.apply_averaged, result.grads, i)
        self._refresh_shadows(i + 1)
        self.sent_grads.clear()
        self.iteration_done.pop(i, None)
        self.iteration_steps = {k: v for k, v in self.iteration_steps.items() if k >= i}
        # The new version reaches the DHT with the next heartbeat, not here: a signed store per node per step cost
        # more CPU than the model (data nodes learn versions from the replies, replicas their group from them).

    async def _group(self, i: int) -> set[str]:
        """The replicas of this stage that average at the end of iteration `i`: the ones the data nodes told to step
        (every replica gets the same lists, so the members agree on the group, and no DHT read is on the path of a
        step). From a data node that sends no list: the replicas at this version in a fresh view, and every live
        replica a data node routed through (those hold gradients that must not be left out)."""
        used = self.iteration_used.pop(i, set())
        told = self.iteration_group.pop(i, None)
        if told is not None:
            return told | {self.peer_id}  # the data nodes' lists hold the live replicas they routed through
        live = serving(await self.live_nodes(max_age=0), "relay", self.stage)
        return {p for p, r in live.items() if r.state_version == i} | (used & set(live))

    async def _drain_tasks(self) -> None:
        """Let in-flight backward work finish (bounded) before the gradients are read."""
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.cfg.call_timeout)

    async def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        for t in [*self.tasks, *(s.refreshing for s in self.shadows.values() if s.refreshing is not None)]:
            t.cancel()
        await super().close()
