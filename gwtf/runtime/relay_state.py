"""A relay's state and shared helpers; the relay is built up in layers, each a file:
relay_state.RelayBase -> joining.RelayJoining -> iteration_end.RelayIterationEnd -> relay.RelayNode (serving)."""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from gwtf.averaging import GroupAverager
from gwtf.device import wire_dtype
from gwtf.errors import BadMessage, UserError
from gwtf.membership import Membership, NodeRecord
from gwtf.runtime import schema
from gwtf.runtime.node import NodeBase
from gwtf.runtime.spec import NodeOptions, RunSpec
from gwtf.stage import Key, StageReplica
from gwtf.transport import Message, Transport

log = logging.getLogger(__name__)


class RelayBase(NodeBase):
    """A relay's state: its stage, its replica once it holds one, what it holds and owes per microbatch and per
    iteration, its recovery strategy; and the helpers its serving, joining and iteration end share."""

    role = "relay"

    def __init__(self, spec: RunSpec, transport: Transport, membership: Membership, opts: NodeOptions, stage: int):
        super().__init__(spec, transport, membership, opts)
        if not 1 <= stage <= spec.model.n_stages:
            raise UserError(f"stage must be in 1..{spec.model.n_stages}, got {stage}")
        self.stage = stage
        self.replica: StageReplica | None = None
        self.base_ready = False  # holds a LoRA stage's frozen base downloaded from a donor (gwtf.lora)
        self.compute_s = 0.0
        self.iteration_done: dict[int, set[str]] = {}
        self.iteration_used: dict[int, set[str]] = {}  # replicas of this stage the data nodes routed through
        self.iteration_group: dict[int, set[str]] = {}  # replicas of this stage the data nodes told to step
        self.iteration_steps: dict[int, asyncio.Future] = {}
        self.resyncs: dict[int, asyncio.Future] = {}  # version -> the download that resynchronises this replica
        self.averager = GroupAverager(transport, spec.run_id, f"stage{stage}", config=self.run.averaging,
                                      floor_mbps=self.run.iteration.floor_bandwidth_mbps)  # fmt: skip
        self.tasks: set[asyncio.Task] = set()
        self.catching_up: asyncio.Future | None = None
        self.watchdog: asyncio.Future | None = None  # _watch_version, once serving
        self.routed_at = 0.0  # when a microbatch at this replica's version last came in
        self.incoming: set[Key] = set()  # forwards acknowledged, not computed yet (they count against capacity)
        self.sent_grads: dict[Key, tuple[torch.Tensor, list[str]]] = {}  # until the iteration ends, for regrad
        self.timings: dict[Key, tuple[float, float | None]] = {}  # (serve_s, call_s onward) per forward: schema.timing
        self.recovery = self.run.recovery.make()  # the run's recovery strategy, with the hooks this relay calls
        self.rebuilt_source = ""  # how this replica's stage was rebuilt, if it was ("mean(1,3)", "shadow@stage 1 v4")

    def record(self) -> NodeRecord:
        r = self.replica
        return NodeRecord(
            peer_id=self.peer_id,
            role="relay",
            stage=self.stage,
            status=self.status,
            capacity=r.capacity if r else self.opts.capacity or 0,  # derived once the stage is built, without one
            compute_s=self.compute_s,
            region=self.opts.region,
            state_version=r.version if r else -1,
            holds_weights=r is not None,
            grad_norm=r.last_grad_norm if r else None,
            throughput=(r.stats.backward / max(time.time() - self.started, 1e-6)) if r else 0.0,
            microbatches_done=r.stats.backward if r else 0,
            maddrs=list(self.maddrs),
            room=self.router.room(),
            device=next(r.module.parameters()).device.type if r else "cpu",
            held=len(r.held) if r else 0,
            rebuilt_from=self.rebuilt_source,
        )

    # ---- validation and helpers -------------------------------------------------------------------------------
    def validate(self, msg: Message, handler: str) -> None:
        """By the handler called (the sender chooses `msg.kind`, not which checks apply): required fields, shape and
        dtype of activations and gradients against the model config, route sanity."""
        schema.check_meta(schema.RELAY, handler, msg)
        schema.check_names(handler, msg)
        if handler in schema.ACTIVATIONS:
            m, wire = self.spec.model, wire_dtype(self.run.train.precision)  # activations in the run's dtype
            for t in msg.tensors:
                if t.dim() != 3 or t.shape[1] > m.seq_len or t.shape[2] != m.d_model or t.dtype != wire:
                    raise BadMessage(
                        f"expected {wire} (batch, <= {m.seq_len}, {m.d_model}), got {t.dtype} {tuple(t.shape)}"
                    )
            route, order = msg.meta.get("route"), msg.meta.get("order")
            if not isinstance(route, list) or len(route) != m.n_stages or self.peer_id not in route:
                raise BadMessage(f"route does not pass through this replica of stage {self.stage}")
            if not isinstance(order, list) or sorted(order) != list(range(1, m.n_stages + 1)):
                raise BadMessage("order must visit every relay stage once")
            if order[route.index(self.peer_id)] != self.stage:
                raise BadMessage(f"route sends another stage's work to this replica of stage {self.stage}")
            schema.check_tensor_count(schema.RELAY, handler, msg)

    def _pos(self, msg: Message) -> int:
        """This replica's position in the microbatch's visit order (CheckFree+ swaps stages on some microbatches)."""
        return list(msg.meta["route"]).index(self.peer_id)

    def _key(self, msg: Message) -> Key:
        return (str(msg.meta["origin"]), msg.microbatch_id, int(msg.meta.get("attempt", 0)))

    def _relay_msg(self, msg: Message, kind: str, tensors: list[torch.Tensor], route: list[str]) -> Message:
        meta = schema.routed(route, msg.meta["order"], msg.meta["origin"], msg.meta.get("attempt", 0))
        return self.message(
            kind, iteration=msg.iteration, microbatch_id=msg.microbatch_id, stage=self.stage, tensors=tensors, meta=meta
        )

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.task_done)

    def task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("relay %s: %s", self.peer_id[:8], task.exception())
