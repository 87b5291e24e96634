"""Stage 0's copy on the relays of stage 1 (gwtf.runtime.stage0_copy): pushed in byte-sized parts, kept whole or not
at all, read back part by part by a new data node."""

import asyncio
import time

import pytest
import torch

from gwtf.errors import BadMessage
from gwtf.membership import NodeRecord
from gwtf.runtime import stage0_copy
from gwtf.runtime.stage0_copy import Stage0Keeper, _slices, copy_parts, keepers, newest_copy, push_copy
from gwtf.transport import InProcessNetwork, Message
from tests.support import StubNode


def record(peer: str, role: str, stage: int) -> NodeRecord:
    return NodeRecord(peer, role, stage, "serving", 4 if stage else 0, 0.1, None, 0, True, None, 0.0, 0)


def node(network: InProcessNetwork, peer_id: str, records: dict) -> StubNode:
    """What the copy uses of a node: its transport, bounded calls, messages of its run, the live records."""
    return StubNode(network, peer_id, records, n_stages=3, run_id="copy-run", call_timeout=5.0)


def state(version: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """A stage 0's `StageReplica.state()`: an embedding, a norm and a head, each with two Adam moments."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (64, 16), "norm.weight": (16,), "head.weight": (64, 16)}
    tensors = {f"{kind}/{n}": torch.randn(s, generator=g) for n, s in shapes.items()
               for kind in ("param", "exp_avg", "exp_avg_sq")}  # fmt: skip
    return tensors, {"version": version, "steps": dict.fromkeys(shapes, float(version)), "lr_scale": 1.0}


def test_copy_parts_are_byte_sized_slices():
    tensors, _ = state(1)
    whole = [(k, 0, t.numel()) for k, t in tensors.items()]
    assert copy_parts(tensors) == [whole]  # 25 KB: one part
    # 4 KiB per matrix's tensor, 64 B per norm's: the last moment of the head is cut across two parts
    parts = copy_parts(tensors, chunk_bytes=12 << 10)
    assert parts == [
        whole[:3],
        [*whole[3:8], ("exp_avg_sq/head.weight", 0, 976)],
        [("exp_avg_sq/head.weight", 976, 1024)],
    ]
    for chunk in (12 << 10, 1000, 4, 1):
        parts = copy_parts(tensors, chunk_bytes=chunk)
        assert all(sum((hi - lo) * 4 for _, lo, hi in part) <= max(chunk, 4) for part in parts)
        assert sum(hi - lo for part in parts for _, lo, hi in part) == sum(t.numel() for t in tensors.values())


def test_a_copy_pushed_in_parts_is_kept_whole_and_read_back(monkeypatch):
    monkeypatch.setattr(stage0_copy, "COPY_CHUNK_BYTES", 1000)  # 25 KB in 25 parts, tensors cut across them

    async def go():
        network = InProcessNetwork()
        records = {"d0": record("d0", "data", 0), "r1": record("r1", "relay", 1), "r2": record("r2", "relay", 1)}
        data, new = node(network, "d0", records), node(network, "d1", records)
        keepers = {}
        for peer in ("r1", "r2"):
            keepers[peer] = Stage0Keeper(node(network, peer, records))
            for name, fn in keepers[peer].handlers().items():
                keepers[peer].node.transport.add_handler(name, fn)
        assert await newest_copy(new, records) is None  # nobody holds one yet
        v5, meta5 = state(5)
        assert await push_copy(data, v5, meta5, records) == 2
        count = len(copy_parts(v5, 1000))
        assert count == 25 and all(k.copy is not None and k.copy.count == count for k in keepers.values())
        # A data node that dies mid-copy: r2 got only the first part of version 6 and keeps version 5 whole.
        v6, meta6 = state(6, seed=1)
        assert await push_copy(data, v6, meta6, {p: r for p, r in records.items() if p != "r2"}) == 1
        pieces = copy_parts(v6, 1000)[0]
        shapes = {k: list(t.shape) for k, t in v6.items()}
        meta = {**meta6, "shapes": shapes, "pieces": [list(p) for p in pieces], "part": 0, "parts": count}
        await data.call("r2", "keep_stage0", data.message("keep_stage0", tensors=_slices(v6, pieces), meta=meta))
        assert keepers["r2"].copy.version == 5 and keepers["r2"].pending.version == 6
        tensors, meta = await newest_copy(new, records)  # the newest whole copy: r1's version 6
        assert meta["version"] == 6 and meta["steps"] == meta6["steps"] and meta["lr_scale"] == 1.0
        assert tensors.keys() == v6.keys() and all(torch.equal(tensors[k], v6[k]) for k in v6)
        del records["r1"]  # r1 gone: r2's whole version 5 is the newest left
        tensors, meta = await newest_copy(new, records)
        assert meta["version"] == 5 and all(torch.equal(tensors[k], v5[k]) for k in v5)
        # Only a serving data node hands stage 0 on; a part says which of how many it is and what its slices are.
        with pytest.raises(BadMessage, match="only a serving data node"):
            await keepers["r2"].rpc_keep_stage0(Message(kind="keep_stage0", run_id="copy-run", sender="d1"))
        bad = {**meta, "shapes": shapes, "pieces": [["param/norm.weight", 0, 5]], "part": 0, "parts": 1}
        with pytest.raises(BadMessage, match="as long as it says"):
            await keepers["r2"].rpc_keep_stage0(
                data.message("keep_stage0", tensors=[torch.ones(4)], meta=bad, sender="d0")
            )
        with pytest.raises(BadMessage, match="part < parts"):
            await keepers["r2"].rpc_keep_stage0(data.message("keep_stage0", meta={**bad, "part": 1}, sender="d0"))
        assert keepers["r2"].copy.version == 5

    asyncio.run(asyncio.wait_for(go(), timeout=30))


def test_the_copy_outlives_every_data_node_and_every_replica_of_stage_1():
    # A 3-stage run: the replicas of stages 1 and 3 keep the copy, not stage 2's; with every data node and every
    # replica of stage 1 gone at once, a new data node takes stage 0 from stage 3.
    async def go():
        network = InProcessNetwork()
        records = {"d0": record("d0", "data", 0), "a": record("a", "relay", 1), "b": record("b", "relay", 2),
                   "c": record("c", "relay", 3)}  # fmt: skip
        for peer in ("a", "b", "c"):
            keeper = Stage0Keeper(node(network, peer, records))
            for name, fn in keeper.handlers().items():
                keeper.node.transport.add_handler(name, fn)
        data = node(network, "d0", records)
        assert keepers(data, records) == ["a", "c"]
        v4, meta4 = state(4)
        assert await push_copy(data, v4, meta4, records) == 2
        for gone in ("d0", "a"):
            del records[gone]
        tensors, meta = await newest_copy(node(network, "d1", records), records)
        assert meta["version"] == 4 and all(torch.equal(tensors[k], v4[k]) for k in v4)

    asyncio.run(asyncio.wait_for(go(), timeout=30))


def test_copies_rest_so_they_take_at_most_their_share_of_the_links(monkeypatch):
    """A copy that took T seconds is followed by (1 / share - 1) * T seconds in which every step's copy is skipped:
    at real sizes copies are bigger than a step's traffic and would otherwise hold the data node's links."""
    from types import SimpleNamespace

    from gwtf.runtime import datanode
    from gwtf.runtime.datanode import DataNode

    async def slow_push(node, tensors, meta, nodes):
        await asyncio.sleep(0.2)
        return 2

    monkeypatch.setattr(datanode, "push_copy", slow_push)

    async def go():
        fake = SimpleNamespace(run=SimpleNamespace(iteration=SimpleNamespace(stage0_copy_share=0.25)), copy_due=0.0,
                               copying=None)  # fmt: skip
        assert not DataNode._copy_busy(fake)  # type: ignore[arg-type]
        fake.copying = asyncio.ensure_future(DataNode._push_and_rest(fake, ({}, {"version": 1}), {}))  # type: ignore
        await asyncio.sleep(0.05)
        assert DataNode._copy_busy(fake)  # type: ignore[arg-type]  # on its way
        assert await fake.copying == 2
        rest = fake.copy_due - time.monotonic()
        assert 0.5 < rest <= 0.61  # 3 x 0.2 s: the copy had a quarter of the time
        assert DataNode._copy_busy(fake)  # type: ignore[arg-type]  # resting
        fake.copy_due = time.monotonic()
        assert not DataNode._copy_busy(fake)  # type: ignore[arg-type]

    asyncio.run(asyncio.wait_for(go(), timeout=10))
