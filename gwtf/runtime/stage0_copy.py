"""Stage 0 outlives its data nodes: after every step a data node hands its stage 0 (embedding, final norm, head, their
optimizer moments, its version: the run's step) to the replicas of stage 1, and a data node that starts with no live
data node ahead of it takes the newest copy from them.

Why relays of stage 1: every data node talks to them each step anyway, and they hold no other copy of stage 0 (the
alternative, CheckFree+'s copy of the embeddings on the edge stages, trains them there; this keeps them exact). The
copy is pushed after the data node's optimizer step and before it tells the relays to step, so a data node that dies
in between leaves the copy one step ahead of the relays, never behind: the relays then take the step without that
update (DataNode._advance_stale), as after any loss of a step's update. Cost: stage 0's state (parameters and two
Adam moments, fp32) per step to each replica of stage 1; a stage 0 larger than MAX_COPY_BYTES is not copied (one
message carries it; chunking it as state downloads do is left to do).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import torch

from gwtf.errors import BadMessage, PeerError
from gwtf.membership import NodeRecord, serving
from gwtf.stage import state_subset
from gwtf.transport import Message

if TYPE_CHECKING:
    from gwtf.runtime.node import NodeBase

log = logging.getLogger(__name__)

MAX_COPY_BYTES = 64 << 20  # a stage 0 state larger than this is not copied (one message per step)
COPY_STAGE = 1  # the relay stage whose replicas keep the copy


class Stage0Keeper:
    """A relay's copy of stage 0: the newest state a data node pushed (`keep_stage0`), served to a new data node
    (`get_stage0`)."""

    def __init__(self, node: NodeBase) -> None:
        self.node = node
        self.keys: list[str] = []
        self.tensors: list[torch.Tensor] = []
        self.meta: dict | None = None

    def handlers(self) -> dict:
        return {"keep_stage0": self.rpc_keep_stage0, "get_stage0": self.rpc_get_stage0}

    async def rpc_keep_stage0(self, msg: Message) -> Message:
        nodes = await self.node.live_nodes()
        if msg.sender not in serving(nodes, "data"):
            raise BadMessage("only a serving data node hands on stage 0")
        version, keys = msg.meta.get("version"), msg.meta.get("keys")
        if type(version) is not int or not isinstance(keys, list) or len(keys) != len(msg.tensors):
            raise BadMessage("keep_stage0 needs an int version and one key per tensor")
        if not all(isinstance(k, str) for k in keys) or not all(bool(torch.isfinite(t).all()) for t in msg.tensors):
            raise BadMessage("keep_stage0: keys must be names and tensors finite")
        if self.meta is None or version >= self.meta["version"]:
            self.keys, self.tensors, self.meta = list(keys), list(msg.tensors), dict(msg.meta)
        return self.node.message("ack", meta={"version": self.meta["version"]})

    async def rpc_get_stage0(self, msg: Message) -> Message:
        if self.meta is None:
            raise BadMessage("this relay holds no copy of stage 0")
        return self.node.message("stage0", tensors=list(self.tensors), meta={**self.meta, "keys": list(self.keys)})


async def push_copy(node: NodeBase, tensors: dict[str, torch.Tensor], meta: dict, nodes: dict[str, NodeRecord]) -> int:
    """Hand stage 0's state (`StageReplica.state()`) to the replicas of COPY_STAGE; returns how many kept it. Bounded
    by the transport's call timeout; a replica that fails is logged, the step goes on."""
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if size > MAX_COPY_BYTES:
        log.debug("stage 0's state is %d MB: not copied to the relays", size >> 20)
        return 0
    part, meta = state_subset(tensors, meta, None)
    msg = node.message("keep_stage0", tensors=part, meta=meta)
    keepers = sorted(serving(nodes, "relay", COPY_STAGE))
    replies = await asyncio.gather(*(node.call(p, "keep_stage0", msg) for p in keepers), return_exceptions=True)
    for peer, reply in zip(keepers, replies, strict=True):
        if isinstance(reply, BaseException):
            log.info("stage 0's copy to relay %s failed (%s)", peer[:8], reply)
    return sum(not isinstance(r, BaseException) for r in replies)


async def newest_copy(node: NodeBase, nodes: dict[str, NodeRecord]) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The newest copy of stage 0 that the replicas of COPY_STAGE hold (None if none does)."""
    keepers = sorted(serving(nodes, "relay", COPY_STAGE))
    msg = node.message("get_stage0")
    replies = await asyncio.gather(*(node.call(p, "get_stage0", msg) for p in keepers), return_exceptions=True)
    copies = [r for r in replies if isinstance(r, Message) and type(r.meta.get("version")) is int]
    for peer, reply in zip(keepers, replies, strict=True):
        if isinstance(reply, (PeerError, BadMessage)):
            log.info("relay %s has no copy of stage 0 (%s)", peer[:8], reply)
    if not copies:
        return None
    best = max(copies, key=lambda r: r.meta["version"])
    keys = best.meta.get("keys")
    if not isinstance(keys, list) or len(keys) != len(best.tensors):
        raise BadMessage("a copy of stage 0 without one key per tensor")
    return dict(zip(keys, best.tensors)), {k: v for k, v in best.meta.items() if k != "keys"}
