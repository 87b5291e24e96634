"""Redundant computation, Bamboo's baseline: the relays of stage k-1 also hold stage k (a shadow) and run its forward
on every microbatch, so a stage that lost every replica is taken over exactly: weights, optimizer moments, version.

Stage 1's shadow is held by stage 2 (its predecessor would be the data nodes, which are out of scope here); the
one-process benchmark places shadows the same way (`shadow_holder_stage`). After every step a holder fetches the new
state of the stage it shadows from one live replica of it, in the background, and it runs that stage's forward on
its own output of every microbatch in the pipeline's bubbles, as Bamboo does: when no forward of its own waits for
its compute thread (the stage-1 shadow on stage 2 has no input there: it costs only the compute delay the churn
harness emulates). A joiner for a stage with no live replica then takes the shadow over exactly. In the one-process
benchmark the shadows are copies taken after each step (the same state).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import functools
import logging
import time
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gwtf.errors import BadMessage, PeerError, UserError
from gwtf.membership import serving
from gwtf.models.presets import ModelConfig
from gwtf.recovery.base import BuildModule, Handler, LiveRelay, RebuiltStage, RecoveryStrategy, StateDict, state_copy
from gwtf.recovery.baselines import CopyNeighbour
from gwtf.stage import StageReplica, state_subset, timed
from gwtf.transport import Message

log = logging.getLogger(__name__)
BUBBLE_POLL_S = 0.005  # how often a redundant forward waiting for a bubble looks again
MAX_BACKLOG = 64  # redundant forwards waiting for a bubble; beyond this the oldest is dropped (and counted)


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
        _, took = timed(self.forward, hidden if self.fed else None)
        self.forward_s += took
        self.forwards += 1


def redundancy_cost(shadows: dict[int, Shadow]) -> str:
    """One log line with a relay's running totals (the churn harness reads the last one from each relay's log)."""
    fetched = sum(s.fetched_bytes for s in shadows.values())
    seconds, forwards = sum(s.forward_s for s in shadows.values()), sum(s.forwards for s in shadows.values())
    return f"redundant cost: shadow_bytes={fetched} redundant_forward_s={seconds:.4f} redundant_forwards={forwards}"


class RedundantRecovery(RecoveryStrategy):
    """Each stage k is shadowed by the relays of stage `shadow_holder_stage(k)`: k-1, and stage 2 for stage 1.

    The shadow runs stage k's forward on every microbatch, in the holder's idle time (the extra compute: one more
    stage forward per stage, about a third of a stage's forward + backward, free where the pipeline has bubbles)
    and keeps its weights and optimizer state in step, so a lost stage is taken over exactly. If the shadow's holder
    is lost at the same time, the shadow is gone too: the stage falls back to copying a neighbour (logged, and named
    in `RebuiltStage.source`).
    """

    name = "redundant"

    def __init__(self, extra_forward_fraction: float = 1.0 / 3.0) -> None:
        if not 0.0 <= extra_forward_fraction <= 2.0:
            raise UserError(f"redundant extra forward fraction must be in [0, 2], got {extra_forward_fraction}")
        self.extra_forward_fraction = extra_forward_fraction
        self.saved: dict[int, tuple[StateDict, dict[str, Any]]] = {}  # the one-process simulation's shadows
        self.shadows: dict[int, Shadow] = {}  # live: the neighbouring stage(s) this strategy's relay shadows
        self.backlog: collections.deque[torch.Tensor] = collections.deque()  # outputs waiting for a bubble
        self.dropped = 0  # redundant forwards dropped from a full backlog (no bubble came in time)
        self.drainer: asyncio.Task | None = None

    def after_step(self, step: int, modules: Mapping[int, nn.Module], optimizers: Mapping[int, Any]) -> None:
        # In a deployment the shadow computes its own update; in one process copying the result is the same state.
        for k, module in modules.items():
            if k >= 1:
                self.saved[k] = (state_copy(module), copy.deepcopy(optimizers[k].state_dict()))

    def rebuild(
        self,
        lost: int,
        stages: Mapping[int, nn.Module],
        grad_norms: Mapping[int, float],
        cfg: ModelConfig,
        seed: int,
    ) -> RebuiltStage:
        holder = shadow_holder_stage(lost, cfg.n_stages)  # the live swarm's placement
        if lost in self.saved and holder is not None and holder in stages:
            state, opt_state = self.saved[lost]
            return RebuiltStage({n: t.clone() for n, t in state.items()}, 1.0, False, 0, copy.deepcopy(opt_state),
                                f"shadow@{holder}")  # fmt: skip
        log.warning("redundant: the shadow of stage %d died with stage %d; copying a neighbour", lost, holder)
        fallback = CopyNeighbour().rebuild(lost, stages, grad_norms, cfg, seed)
        fallback.source += " (shadow lost)"
        return fallback

    # ---- live: a relay of stage k-1 holds stage k's shadow ------------------------------------------------------
    def handlers(self, relay: LiveRelay) -> dict[str, Handler]:
        return {"get_shadow": functools.partial(self.rpc_get_shadow, relay)}

    async def on_serving(self, relay: LiveRelay, build_module: BuildModule) -> None:
        """This relay's shadows of its neighbouring stage(s). Built from the seed (or the run's checkpoint) they
        are exact at version 0; a relay that joins a run under way fetches them at once."""
        assert relay.replica is not None
        for k in shadowed_stages(relay.stage, relay.spec.model.n_stages):
            module = await relay.compute(build_module, k)
            replica = StageReplica(k, module, relay.spec.optim, relay.spec.total_steps, capacity=1)
            self.shadows[k] = Shadow(replica, fed=k == relay.stage + 1)
        if relay.replica.version > 0:
            self.on_step(relay, relay.replica.version)

    def on_forward(self, relay: LiveRelay, out: torch.Tensor) -> None:
        if not self.shadows:
            return
        if len(self.backlog) >= MAX_BACKLOG:
            self.backlog.popleft()
            self.dropped += 1
        self.backlog.append(out)
        if self.drainer is None or self.drainer.done():
            self.drainer = asyncio.ensure_future(self._shadow_forwards(relay))
            self.drainer.add_done_callback(relay.task_done)

    def on_step(self, relay: LiveRelay, version: int) -> None:
        """Start bringing every shadow up to `version`, in the background (never on a step's path)."""
        for shadow in self.shadows.values():
            if shadow.refreshing is not None and not shadow.refreshing.done():
                log.info("relay %s: shadow of stage %d still fetching v%d; v%d waits for the next step",
                         relay.peer_id[:8], shadow.stage, shadow.version, version)  # fmt: skip
                continue
            shadow.refreshing = asyncio.ensure_future(self._refresh_shadow(relay, shadow, version))
            shadow.refreshing.add_done_callback(relay.task_done)

    async def rebuild_live(self, relay: LiveRelay, build_module: BuildModule) -> tuple[RebuiltStage, int] | None:
        """A live shadow holder's copy is taken over exactly; only where none is left (or it is too old) is a
        neighbour copied, as the one-process `rebuild` does."""
        if await self._take_over_shadow(relay):
            return None
        fallback = CopyNeighbour()
        fallback.check(relay.spec.model)
        result = await fallback.rebuild_live(relay, build_module)
        assert result is not None
        result[0].source += " (shadow lost)"
        return result

    def close(self) -> None:
        if self.drainer is not None:
            self.drainer.cancel()
        for shadow in self.shadows.values():
            if shadow.refreshing is not None:
                shadow.refreshing.cancel()

    async def rpc_get_shadow(self, relay: LiveRelay, msg: Message) -> Message:
        """The shadow of stage `stage` this relay holds, like get_state; with `version_only`, just its version."""
        stage = msg.meta["stage"]
        shadow = self.shadows.get(stage) if type(stage) is int else None
        if shadow is None or relay.status != "serving":
            raise BadMessage(
                f"this relay of stage {relay.stage} holds no shadow of stage {stage!r} "
                f"(it shadows {sorted(self.shadows) or 'none'}; recovery is {self.name!r})"
            )
        if msg.meta.get("version_only"):
            return relay.message("shadow", meta={"stage": stage, "version": shadow.version})
        tensors, meta = await relay.compute(shadow.replica.state)
        part, meta = state_subset(tensors, meta, msg.meta.get("names"))
        return relay.message("state", tensors=part, meta=meta)

    async def _take_over_shadow(self, relay: LiveRelay) -> bool:
        """Load this stage's state from the live shadow holder with the newest shadow (exact: weights, optimizer
        moments, version; no learning-rate boost). False, with a warning that says why, where no live holder has
        one at most a step older than the run (the shadow died with its holder): the caller copies a neighbour."""
        assert relay.replica is not None
        holder_stage = shadow_holder_stage(relay.stage, relay.spec.model.n_stages)
        holders = sorted(serving(await relay.live_nodes(max_age=0), "relay", holder_stage)) if holder_stage else []
        probe = relay.message("get_shadow", meta={"stage": relay.stage, "version_only": True})
        replies = await asyncio.gather(*(relay.call(h, "get_shadow", probe) for h in holders), return_exceptions=True)
        versions = {}
        for holder, reply in zip(holders, replies):
            if isinstance(reply, Message) and type(reply.meta.get("version")) is int:
                versions[holder] = reply.meta["version"]
            else:
                log.info("relay %s: no shadow of stage %d from %s (%s)", relay.peer_id[:8], relay.stage, holder[:8],
                         reply)  # fmt: skip
        usable = sorted((v, h) for h, v in versions.items() if v >= relay.run_version - 1)
        names = [n for n, _ in relay.replica.module.named_parameters()]
        for _, holder in reversed(usable):  # the newest first
            try:
                tensors, meta = await relay.fetch_state_from([holder], names, "get_shadow", stage=relay.stage)
                await relay.compute(relay.replica.load_state, tensors, meta)
            except (PeerError, BadMessage) as exc:
                log.warning("relay %s: taking over the shadow from %s failed (%s)", relay.peer_id[:8], holder[:8], exc)
                continue
            relay.replica.boost = None  # an exact takeover: the lost stage's own learning rate goes on
            relay.rebuilt_source = f"shadow@stage {holder_stage} v{relay.replica.version}"
            if relay.replica.version < relay.run_version:
                # The stage died in the step after the shadow's version, before its holders fetched the new state:
                # that one update is lost. Take the run's version without it at once, as a data node would have
                # this stage do after a grace (rpc_advance), and as a CheckFree rebuild takes its neighbours'.
                await relay.compute(relay.replica.skip_step, relay.run_version)
                relay.rebuilt_source += f", v{relay.run_version} without that step's update"
            log.warning("relay %s rebuilt lost stage %d at v%d: %s (from %s)", relay.peer_id[:8], relay.stage,
                        relay.replica.version, relay.rebuilt_source, holder[:8])  # fmt: skip
            return True
        why = (
            f"its shadows are at {sorted(set(versions.values()))}, over a step behind the run's v{relay.run_version}"
            if versions
            else f"no live relay of stage {holder_stage} holds one (the shadow died with them)"
        )
        log.warning("redundant: no usable shadow of lost stage %d: %s; falling back to copying a neighbour "
                    "(copy (shadow lost))", relay.stage, why)  # fmt: skip
        return False

    async def _refresh_shadow(self, relay: LiveRelay, shadow: Shadow, version: int) -> None:
        """Fetch stage `shadow.stage`'s state at `version` or newer from one live replica of it (bounded in tries
        and time); a failure is logged and the next step tries again."""
        names = [n for n, _ in shadow.replica.module.named_parameters()]
        deadline = time.monotonic() + relay.spec.config.iteration.iteration_timeout
        for _ in range(2 * relay.spec.config.iteration.max_attempts):
            if relay.closed or time.monotonic() > deadline:
                break
            donors = sorted(serving(await relay.live_nodes(), "relay", shadow.stage))
            if not donors:
                log.warning("relay %s: no live replica of stage %d to bring its shadow to v%d (it stays at v%d)",
                            relay.peer_id[:8], shadow.stage, version, shadow.version)  # fmt: skip
                return
            donor = donors[zlib.crc32(relay.peer_id.encode()) % len(donors)]  # holders spread over the replicas
            try:
                tensors, meta = await relay.fetch_state_from([donor], names, min_version=version)
            except (PeerError, BadMessage) as exc:
                log.info("relay %s: shadow fetch from %s failed (%s)", relay.peer_id[:8], donor[:8], exc)
                await asyncio.sleep(0.2)
                continue
            shadow.fetched_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            if meta["version"] > shadow.version:
                await relay.compute(shadow.replica.load_state, tensors, meta)
            if shadow.version >= version:
                log.info("relay %s: shadow of stage %d at v%d; %s", relay.peer_id[:8], shadow.stage, shadow.version,
                         redundancy_cost(self.shadows))  # fmt: skip
                return
            await asyncio.sleep(0.1)  # that replica had not stepped yet
        log.warning("relay %s: shadow of stage %d not brought to v%d (it is at v%d); the next step tries again",
                    relay.peer_id[:8], shadow.stage, version, shadow.version)  # fmt: skip

    async def _shadow_forwards(self, relay: LiveRelay) -> None:
        """Bamboo's cost, in the pipeline's bubbles (Bamboo, Thorpe et al., NSDI '23: redundant forwards fill the
        bubbles of the pipeline schedule): each waiting output's shadow forwards run on the compute thread only
        while no forward of the relay's own waits for it."""
        while self.backlog and not relay.closed:
            if relay.incoming:  # its own work first: the redundant forward waits for a bubble
                await asyncio.sleep(BUBBLE_POLL_S)
                continue
            out = self.backlog.popleft()
            for shadow in self.shadows.values():
                await relay.compute(shadow.timed_forward, out)
