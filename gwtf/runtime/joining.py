"""A relay joins: it announces itself, takes its stage's state (from live replicas at the stage's newest version, from
the seed or the run's checkpoint at a run's start, or rebuilt by the run's recovery strategy when the stage lost every
replica), serves, and catches up by itself whenever it is left a step behind."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import torch

from gwtf.errors import BadMessage, PeerError, UserError
from gwtf.lora import keep_own_frozen, trainable_names
from gwtf.membership import NodeRecord, serving
from gwtf.optim import make_optimizer
from gwtf.recovery import install
from gwtf.runtime.relay_state import RelayBase
from gwtf.runtime.state import fetch_state, state_wait
from gwtf.runtime.views import view_builder
from gwtf.sizing import derive_capacity
from gwtf.stage import StageReplica, state_bytes, state_subset
from gwtf.transport import Message

log = logging.getLogger(__name__)
IDLE_BEFORE_VERSION_CHECK_S = 3.0  # a replica routed through more recently is not behind (see _watch_version)


class RelayJoining(RelayBase):
    """Joining, state download, stage rebuild, catching up, and serving the stage's state to others."""

    async def start(self, build_module, timeout: float = 60.0) -> None:
        """Announce, take the stage's state (from live replicas, or from the seed at a run's start), serve."""
        await self.announce()
        nodes = await self.fresh_versions(await self.live_nodes(max_age=0))
        self.run_version = max((r.state_version for r in nodes.values()), default=0)  # for fault points
        await self.fault("joining", self.run_version)
        module = await self.compute(lambda k: build_module(k).to(self.device), self.stage)  # built from the seed, moved
        train = self.run.train
        self.replica = StageReplica(self.stage, module, self.spec.optim, self.spec.total_steps, self.opts.capacity or 1,
                                    precision=train.precision, checkpointing=train.activation_checkpointing,
                                    dropout_seed=train.seed if self.spec.model.dropout > 0 else None)  # fmt: skip
        if self.opts.capacity is None:  # no --capacity: what the device's memory holds (gwtf.sizing)
            m = self.spec.model
            figures = await self.compute(derive_capacity, self.replica, self.spec.microbatch_size, m.seq_len,
                                         m.d_model, train.microbatches_per_step)  # fmt: skip
            self.replica.capacity = figures.capacity
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
        if not downloaded and self.spec.config.resume:  # a resumed run's first replica: the saved state
            downloaded = await self._load_saved_state()
        if not downloaded and self.run_version > 0:  # the run is under way and this stage has no live replica left
            await self.rebuild_stage(build_module)
        await self.recovery.on_serving(self, build_module)
        self.status = "serving"
        await self.announce()
        self.start_heartbeat()
        self.watchdog = asyncio.ensure_future(self._watch_version())
        views = view_builder(self.spec, self.spec.microbatch_size)
        await self.start_routing(self.stage, lambda records: views(records, None))
        if self.router.room() >= 0:  # a router whose agent publishes its room (gwtf-p2p), for the others' directory
            await self.announce()
        await self._tell_data_nodes(nodes)
        log.info("relay %s serving stage %d at version %d", self.peer_id[:8], self.stage, self.replica.version)

    async def _load_saved_state(self) -> bool:
        """The first replica of a stage in a resumed run (gwtf.resume) loads the stage's saved state and serves at its
        version. Not once the run has gone past that version (the stage lost every replica later: its recovery
        rebuilds it); a node without the state on its machine (and no replica to download from) is told so."""
        from gwtf.resume import saved_stage

        path = self.spec.config.resume
        assert path is not None and self.replica is not None
        saved = await asyncio.to_thread(saved_stage, path, self.stage, self.run_version,
                                        f"stage {self.stage} has no live replica to download from",
                                        "copy it there, or join once a replica serves")  # fmt: skip
        if saved is None:
            return False
        await self.compute(self.replica.load_state, *saved)
        log.info("relay %s: stage %d from the run's saved state at version %d", self.peer_id[:8], self.stage,
                 self.replica.version)  # fmt: skip
        return True

    async def _tell_data_nodes(self, nodes: dict[str, NodeRecord]) -> None:
        """Data nodes read the DHT about once a heartbeat: tell them this replica serves now (best effort, bounded),
        so that it takes part in the current iteration's step instead of falling behind by one."""
        msg = self.message("relay_serving", meta={"stage": self.stage})
        calls = [
            self.call(p, "relay_serving", msg, timeout=self.run.transport.call_timeout) for p in serving(nodes, "data")
        ]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, Exception):
                log.info("relay %s: telling a data node it serves failed (%s)", self.peer_id[:8], result)

    async def download_state(self, donors: list[str], timeout: float) -> bool:
        """Fetch parameters and optimizer state, parameter names spread over the donors (one version for all).
        False when no live donor is left (the stage is lost: the caller rebuilds it)."""
        assert self.replica is not None
        # The trainable parameters (all of them, or LoRA's adapters); a LoRA base too where this machine has no
        # staged copy to load it from, once (gwtf.lora)
        base_here = self.base_ready or not self.spec.pretrained or Path(self.spec.pretrained).is_dir()
        names = [n for n, p in self.replica.module.named_parameters() if p.requires_grad or not base_here]
        deadline = time.monotonic() + timeout
        # Donors that could not be reached, until their record would have expired: the state is spread over the
        # donors, so one dead donor (SIGKILLed, its record still live for up to a TTL) fails every attempt that
        # includes it, while a live replica of the stage could have served the whole state at once.
        unreachable: dict[str, float] = {}
        while time.monotonic() < deadline:
            try:
                await self.fault("state_download", self.run_version)
                tensors, meta = await self.fetch_state_from(donors, names, failed=unreachable)
                await self.compute(self.replica.load_state, tensors, meta)
                self.base_ready = True
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
                live = sorted(serving(await self.live_nodes(max_age=0), "relay", self.stage))
                if not live:
                    return False
                now, ttl = time.monotonic(), self.run.membership.record_ttl_s
                unreachable = {p: t for p, t in unreachable.items() if now - t < ttl}
                donors = [p for p in live if p not in unreachable] or live
        raise PeerError(f"could not download stage {self.stage} within {timeout:.0f}s")

    async def rebuild_stage(self, build_module) -> None:
        """Rebuild this stage from what is left with the run's recovery strategy (CheckFree: its live neighbours'
        gradient-norm weighted average, fresh optimizer, raised learning rate; redundant: a shadow's exact state)."""
        assert self.replica is not None
        self.recovery.check(self.spec.model)
        result = await self.recovery.rebuild_live(self, build_module)
        if result is None:  # the strategy installed the stage's exact state itself
            return
        rebuilt, version = result
        r = self.replica
        rebuilt.state_dict = keep_own_frozen(rebuilt.state_dict, r.module)  # LoRA: the adapters alone are rebuilt
        r.optimizer = install(rebuilt, r.module, r.optimizer, lambda m: make_optimizer(m, self.spec.optim))
        r.version = version
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

    async def neighbour_stages(self, build_module) -> tuple[dict[int, Any], dict[int, float], list[int]]:
        """The live relay stages next to this one: their parameters (as modules), last gradient norms and versions,
        what a strategy rebuilds this stage from. Where neither adjacent stage is live (neighbouring stages lost
        together), the nearest live stage on each side past them: the first joiner would otherwise find nothing to
        rebuild from, and the run stalled until its data nodes gave up. A stage none of whose replicas answers
        (killed a moment ago, its record still live) counts as lost."""
        nodes = await self.live_nodes(max_age=0)
        modules, norms, versions = {}, {}, []
        n = self.spec.model.n_stages
        adjacent = [
            range(self.stage - 1, max(self.stage - 2, 0), -1),
            range(self.stage + 1, min(self.stage + 1, n) + 1),
        ]
        beyond = [range(self.stage - 1, 0, -1), range(self.stage + 1, n + 1)]
        tried: set[int] = set()
        for sides in (adjacent, beyond):
            for side in sides:
                for j in side:
                    if j in tried:  # an adjacent stage that did not answer: lost
                        continue
                    tried.add(j)
                    got = await self._first_answering(j, sorted(serving(nodes, "relay", j)), build_module)
                    if got is not None:
                        modules[j], version, norms[j] = got
                        versions.append(version)
                        break
            if modules:
                break
        return modules, norms, versions

    async def _first_answering(self, stage: int, donors: list[str], build_module) -> tuple[Any, int, float] | None:
        """Stage `stage` from the first of its replicas that answers (None: no replica does)."""
        for donor in donors:
            try:
                return await self._neighbour(stage, donor, build_module)
            except PeerError as exc:
                log.warning("relay %s: stage %d's replica %s did not answer (%s)", self.peer_id[:8], stage,
                            donor[:8], exc)  # fmt: skip
        return None

    async def _neighbour(self, stage: int, donor: str, build_module) -> tuple[Any, int, float]:
        """Stage `stage`'s current parameters from one of its replicas, as a module, with their version and the
        gradient norm of its last step (from the same snapshot: a DHT record may lag behind)."""
        module = await self.compute(build_module, stage)
        tensors, meta = await self.fetch_state_from([donor], trainable_names(module))  # LoRA: its adapters
        module.load_state_dict({k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("param/")},
                               strict=False)  # fmt: skip
        return module, int(meta["version"]), float(meta.get("grad_norm") or 1.0)

    async def fetch_state_from(
        self,
        donors: list[str],
        names: list[str],
        handler: str = "get_state",
        failed: dict[str, float] | None = None,
        **meta: Any,
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """A stage's state from `donors` through `handler` (get_state, or get_shadow with `stage`), `meta` added to
        each request; a donor whose call fails is noted in `failed` (peer -> when), if given."""

        sizes = state_bytes(self.replica.module) if self.replica is not None else None
        wait = state_wait(self.run.iteration, sizes, names, len(donors))

        async def get(donor: str, msg: Message) -> Message:
            msg.meta.update(meta)
            try:
                return await self.call(donor, handler, msg, timeout=wait)
            except PeerError:
                if failed is not None:
                    failed[donor] = time.monotonic()
                raise

        return await fetch_state(get, self.spec.run_id, donors, names, sizes)

    async def _watch_version(self) -> None:
        """A replica catches up with the run by itself. Data nodes route only through replicas at the iteration's
        version, so one left a step behind (it announced itself as a step ended) is never sent the message that
        would tell it, and stays behind for good, a stale donor for every later joiner. Once a heartbeat it compares
        its version with the data nodes' records (written after their step, so after every used replica stepped);
        behind on two checks in a row and not stepping, it downloads the state."""
        behind_since: int | None = None
        while not self.closed:
            await asyncio.sleep(max(self.run.membership.heartbeat_s, 0.05))
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
                await self.download_state(sorted(donors), self.run.iteration.iteration_timeout)
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
        deadline = time.monotonic() + self.run.transport.call_timeout / 2
        while type(want) is int and self.replica.version < want and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # a shadow holder asks right after its own step: this one is stepping too
        await self.fault("state_donor", self.replica.version)
        tensors, meta = await self.compute(self.replica.state)
        part, meta = state_subset(tensors, meta, msg.meta.get("names"))
        return self.message("state", tensors=part, meta=meta)
