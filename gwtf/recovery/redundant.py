"""Redundant computation, Bamboo's baseline: the relays of stage k-1 also hold stage k (a shadow) and run its forward
on every microbatch, so a stage that lost every replica is taken over exactly: weights, optimizer moments, version.

Stage 1's shadow is held by stage 2 (its predecessor would be the data nodes, which are out of scope here); the
one-process benchmark places shadows the same way (`shadow_holder_stage`). After every step a holder brings its shadow
to the new version in the background, by a delta where it can: it asks one live replica of the stage for the averaged
gradients that replica applied in that step (`get_shadow_step`) and applies the same optimizer step to the shadow, so
the shadow stays bit for bit the replica's state (weights and Adam moments) for a third of the bytes of the full
state (the gradients: 4 bytes a parameter; the parameters and two Adam moments: 12). The replica sends the hash of
its weights after the step with them and the holder checks its own against it; where the delta is not available (the
replica joined or was rebuilt since, the shadow is more than a step behind) or the hashes differ (another device's
kernels, a learning-rate boost the shadow does not know of), it downloads the full state as before. The holder runs
the shadowed stage's forward on its own output of every microbatch in the pipeline's bubbles, as Bamboo does: when
no forward of its own waits for its compute thread (the stage-1 shadow on stage 2 has no input there: it costs only
the compute delay the churn harness emulates). A joiner for a stage with no live replica then takes the shadow over
exactly. In the one-process benchmark the shadows are copies taken after each step (the same state).
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
KEEP_UPDATES = 2  # a replica keeps its last steps' averaged gradients for its shadows (each: 4 bytes a parameter)


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
        self.fetched_bytes = 0  # state and deltas received to keep it in step
        self.deltas = 0  # steps it took by applying a replica's averaged gradients
        self.full_fetches = 0  # steps it took by downloading the full state
        # False while a delta is applied and not yet checked, and from one whose weights hash differed until a full
        # download repairs it: a shadow is never handed over then
        self.exact = True
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
    deltas, full = sum(s.deltas for s in shadows.values()), sum(s.full_fetches for s in shadows.values())
    return (f"redundant cost: shadow_bytes={fetched} redundant_forward_s={seconds:.4f} redundant_forwards={forwards} "
            f"shadow_deltas={deltas} shadow_full_fetches={full}")  # fmt: skip


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
        # live, as a replica of a shadowed stage: version -> (the averaged gradients that made it, weights hash)
        self.updates: collections.OrderedDict[int, tuple[list[torch.Tensor], str | None]] = collections.OrderedDict()

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
        return {
            "get_shadow": functools.partial(self.rpc_get_shadow, relay),
            "get_shadow_step": functools.partial(self.rpc_get_shadow_step, relay),
        }

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

    def on_step(self, relay: LiveRelay, version: int, grads: list[torch.Tensor] | None = None) -> None:
        """Keep this step's averaged gradients for the holders of this stage's shadow (the delta they apply), and
        start bringing every shadow this relay holds up to `version`, in the background (never on a step's path)."""
        if grads is not None and shadow_holder_stage(relay.stage, relay.spec.model.n_stages) is not None:
            self.updates[version] = ([g.detach().to("cpu", copy=True) for g in grads], None)
            while len(self.updates) > KEEP_UPDATES:
                self.updates.popitem(last=False)
            relay.spawn(self._seal_update(relay, version))
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
        if shadow is not None and not shadow.exact:
            raise BadMessage(f"this relay's shadow of stage {stage} is being checked or repaired after a delta")
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

    async def rpc_get_shadow_step(self, relay: LiveRelay, msg: Message) -> Message:
        """The averaged gradients this replica applied to go from `version` to `version` + 1, with the hash of its
        weights after that step: a shadow holder at `version` applies them and checks the hash (a delta refresh).
        A holder asks right after its own step: a replica still stepping is waited for (bounded)."""
        stage, version = msg.meta["stage"], msg.meta["version"]
        if type(stage) is not int or type(version) is not int or stage != relay.stage or relay.replica is None:
            raise BadMessage(f"this relay serves stage {relay.stage}: no update of stage {stage!r} v{version!r}")
        deadline = time.monotonic() + relay.spec.config.transport.call_timeout / 2
        while (entry := self.updates.get(version + 1)) is None or entry[1] is None:
            # gone (kept only KEEP_UPDATES steps), never kept (it joined or was rebuilt since), or not sealed in time
            if (entry is None and relay.replica.version > version + 1) or time.monotonic() > deadline:
                raise BadMessage(f"no update v{version}->v{version + 1} of stage {stage} here (it keeps "
                                 f"{sorted(self.updates) or 'none'}; at v{relay.replica.version})")  # fmt: skip
            await asyncio.sleep(0.02)
        grads, digest = entry
        return relay.message("shadow_step", tensors=list(grads), meta={"stage": stage, "version": version + 1,
                                                                       "hash": digest})  # fmt: skip

    async def _seal_update(self, relay: LiveRelay, version: int) -> None:
        """The hash of the weights the kept update gave, read on the compute thread while the replica is still at
        that version (an update without it is never served: a holder could not check what it applied)."""
        digest = await relay.compute(_digest_at, relay.replica, version)
        entry = self.updates.get(version)
        if digest is not None and entry is not None:
            self.updates[version] = (entry[0], digest)

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
        """Bring the shadow to `version`: by the step's delta when it is one step behind, else (or when the delta
        fails) by fetching stage `shadow.stage`'s state at `version` or newer from one live replica of it (bounded in
        tries and time); a failure is logged and the next step tries again."""
        if shadow.version == version - 1 and shadow.exact and await self._delta_refresh(relay, shadow, version):
            return
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
            if meta["version"] > shadow.version or not shadow.exact:
                await relay.compute(shadow.replica.load_state, tensors, meta)
                shadow.exact = True
                shadow.full_fetches += 1
            if shadow.version >= version:
                log.info("relay %s: shadow of stage %d at v%d; %s", relay.peer_id[:8], shadow.stage, shadow.version,
                         redundancy_cost(self.shadows))  # fmt: skip
                return
            await asyncio.sleep(0.1)  # that replica had not stepped yet
        log.warning("relay %s: shadow of stage %d not brought to v%d (it is at v%d); the next step tries again",
                    relay.peer_id[:8], shadow.stage, version, shadow.version)  # fmt: skip

    async def _delta_refresh(self, relay: LiveRelay, shadow: Shadow, version: int) -> bool:
        """Apply the step from `version` - 1 to `version` that a live replica of the shadowed stage applied (its
        averaged gradients, `get_shadow_step`), then check the weights hash it sent. True when the shadow is at
        `version` and exact; False (logged) where no replica had the delta or the hashes differ (the shadow stays
        marked inexact, as it is from the delta's application to its check: the full download that follows replaces
        it, and no takeover uses it meanwhile)."""
        donors = sorted(serving(await relay.live_nodes(), "relay", shadow.stage))
        if not donors:
            return False
        first = zlib.crc32(relay.peer_id.encode()) % len(donors)  # holders spread over the replicas
        wait = relay.spec.config.iteration.iteration_timeout
        for donor in (donors[first:] + donors[:first])[:2]:
            probe = relay.message("shadow_step", meta={"stage": shadow.stage, "version": version - 1})
            try:
                reply = await relay.call(donor, "get_shadow_step", probe, timeout=wait)
            except (PeerError, BadMessage) as exc:
                log.info("relay %s: no delta v%d->v%d of stage %d from %s (%s)", relay.peer_id[:8], version - 1,
                         version, shadow.stage, donor[:8], exc)  # fmt: skip
                continue
            digest = reply.meta.get("hash")
            if reply.meta.get("version") != version or not isinstance(digest, str):
                log.info("relay %s: malformed delta from %s", relay.peer_id[:8], donor[:8])
                continue
            shadow.fetched_bytes += sum(t.numel() * t.element_size() for t in reply.tensors)
            shadow.exact = False  # stepped but not checked yet: no takeover from it until the hash agrees
            try:
                got = await relay.compute(_apply_step, shadow.replica, list(reply.tensors), version)
            except BadMessage as exc:  # gradients for another set of parameters: the shadow is untouched
                shadow.exact = True
                log.info("relay %s: delta from %s refused (%s)", relay.peer_id[:8], donor[:8], exc)
                continue
            if got != digest:
                log.warning("relay %s: shadow of stage %d off its replica's weights after the delta to v%d; it "
                            "downloads the full state", relay.peer_id[:8], shadow.stage, version)  # fmt: skip
                return False
            shadow.exact = True
            shadow.deltas += 1
            log.info("relay %s: shadow of stage %d at v%d by delta; %s", relay.peer_id[:8], shadow.stage, version,
                     redundancy_cost(self.shadows))  # fmt: skip
            return True
        return False

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


def _digest_at(replica: StageReplica, version: int) -> str | None:
    """The replica's weights hash if it is still at `version` (run on its compute thread, which alone moves it)."""
    return replica.weights_digest() if replica.version == version else None


def _apply_step(replica: StageReplica, grads: list[torch.Tensor], version: int) -> str:
    """The optimizer step from `version` - 1 with these averaged gradients, as the replica that sent them took it
    (`StageReplica.apply_averaged`: the same learning-rate schedule, the same AdamW); the weights hash after it.
    Gradients that do not fit the stage's trainable parameters are refused before anything changes."""
    params = replica.trainable()
    if len(grads) != len(params) or any(not g.is_floating_point() or g.shape != p.shape for g, p in zip(grads, params)):
        raise BadMessage(f"a delta of {len(grads)} tensors does not fit the stage's {len(params)} parameters")
    replica.apply_averaged(grads, version - 1)
    return replica.weights_digest()
