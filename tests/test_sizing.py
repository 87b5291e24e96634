"""Sizes in bytes: transfer waits grow with the bytes over the run's floor bandwidth; state moves in byte-sized
chunks."""

import asyncio

import pytest
import torch

from gwtf.averaging import GroupAverager
from gwtf.errors import UserError
from gwtf.runtime.config import IterationConfig
from gwtf.runtime.state import state_chunks
from gwtf.sizing import chunk_by_bytes, transfer_s, transfer_timeout
from gwtf.stage import STATE_CHUNK_BYTES, STATE_CHUNK_PARAMS
from gwtf.transport import InProcessNetwork, InProcessTransport
from gwtf.transport.links import LinkEmulator

RUN = "sizing"


def test_transfer_times_and_byte_chunks() -> None:
    assert transfer_s(256 << 20, 150.0) == pytest.approx(14.3, abs=0.1)  # the 1.5b activation
    assert transfer_timeout(10.0, 0, 50.0) == 10.0
    assert chunk_by_bytes([5, 5, 5, 20, 1], max_bytes=10, max_items=64) == [range(0, 2), range(2, 3), range(3, 4),
                                                                            range(4, 5)]  # fmt: skip
    assert chunk_by_bytes([1] * 10, max_bytes=100, max_items=4) == [range(0, 4), range(4, 8), range(8, 10)]
    with pytest.raises(UserError, match="floor_bandwidth_mbps"):
        IterationConfig(floor_bandwidth_mbps=0)


def test_state_chunks_are_sized_in_bytes_not_parameter_counts() -> None:
    big = STATE_CHUNK_BYTES // 2 + 1
    sizes = {"a": big, "b": big, "c": 12, "d": 12}
    assert state_chunks(list(sizes), sizes) == [["a"], ["b", "c", "d"]]
    many = [f"p{i}" for i in range(50)]  # small parameters: at most 21 a message (3 tensors each, 64 a message)
    assert [len(c) for c in state_chunks(many, dict.fromkeys(many, 12))] == [STATE_CHUNK_PARAMS, 21, 8]


def averaging_round(floor_mbps: float) -> list:
    """Two replicas averaging 0.75 MiB of gradients over an emulated 1 MiB/s link (0.75 s each way), with a
    0.2 s averaging timeout."""

    async def main():
        net, links = InProcessNetwork(), LinkEmulator(intra_latency_ms=1.0, intra_bandwidth_mb_per_s=1.0)
        avgs = [GroupAverager(InProcessTransport(net, p, RUN, emulator=links), RUN, "stage1", timeout=0.2,
                              floor_mbps=floor_mbps) for p in ("a", "b")]  # fmt: skip
        grads = [torch.ones(3, 64 << 10) / 4] * 1
        return await asyncio.gather(*(a.average(0, [g * (k + 1) for g in grads], 1, ["a", "b"])
                                      for k, a in enumerate(avgs)))  # fmt: skip

    return asyncio.run(main())


def test_averaging_waits_scale_with_bytes_under_link_emulation() -> None:
    # Floor 4 Mbit/s (0.5 MiB/s, under the link's 1 MiB/s): the waits cover the transfer, both replicas average.
    ra, rb = averaging_round(floor_mbps=4.0)
    assert ra.participants == rb.participants == ["a", "b"]
    assert torch.equal(ra.grads[0], rb.grads[0]) and torch.allclose(ra.grads[0], torch.full((3, 64 << 10), 0.375))
    # A floor far above the link (the waits stay at their fixed 0.2 s): the leader goes on without the member.
    ra, _ = averaging_round(floor_mbps=1e6)
    assert ra.participants == ["a"]
