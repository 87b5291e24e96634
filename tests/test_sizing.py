"""Sizes in bytes: transfer waits grow with the bytes over the run's floor bandwidth; state moves in byte-sized
chunks; a relay without --capacity derives it from its device's memory and what a held microbatch keeps."""

import asyncio
import logging

import pytest
import torch

from gwtf import sizing
from gwtf.averaging import GroupAverager
from gwtf.errors import UserError
from gwtf.launch.join import add_arguments
from gwtf.models.presets import get_preset
from gwtf.models.staged import build_stage
from gwtf.optim import OptimConfig
from gwtf.runtime.config import IterationConfig
from gwtf.runtime.state import state_chunks
from gwtf.sizing import (
    GIB,
    capacity_from,
    chunk_by_bytes,
    derive_capacity,
    host_memory,
    kept_bytes,
    transfer_s,
    transfer_timeout,
)
from gwtf.stage import STATE_CHUNK_BYTES, STATE_CHUNK_PARAMS, StageReplica
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
    for share in (0.0, 1.5):
        with pytest.raises(UserError, match="stage0_copy_share"):
            IterationConfig(stage0_copy_share=share)


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


# --- a relay's capacity from its memory -------------------------------------------------------------------------


def test_capacity_formula() -> None:
    # (free - margin - state) / kept, one microbatch left as working room, at most the cap
    assert capacity_from(free=10_000, kept=1_000, state=500, margin=1_500, cap=64) == 7
    assert capacity_from(free=10_000, kept=1_000, state=500, margin=1_500, cap=4) == 4
    assert capacity_from(free=3_000, kept=1_000, state=0, margin=1_000, cap=4) == 1
    with pytest.raises(UserError, match="does not fit.*activation_checkpointing"):
        capacity_from(free=2_999, kept=1_000, state=0, margin=1_000, cap=4)


def replica(precision: str = "fp32", checkpointing: bool = False) -> StageReplica:
    cfg = get_preset("debug")
    return StageReplica(1, build_stage(cfg, 1, 0), OptimConfig(), 1, precision=precision, checkpointing=checkpointing)


def direct(r: StageReplica, rows: int, s: int, d: int) -> int:
    """What a forward of the full microbatch keeps (kept_bytes fits it from probes at 1 and 2 rows)."""
    inp = r._input(torch.randn(rows, s, d).to(r.wire))
    return sizing.saved_bytes(lambda x: r._run(("t", 0, 0), x), inp, list(r.module.parameters()))


def test_kept_bytes_are_measured_from_what_autograd_saves() -> None:
    d, s = 64, 32
    r = replica()
    full = kept_bytes(r, 4, s, d)
    assert not r.held and r.stats.forward == 0  # a probe holds nothing and counts no forward
    assert full == direct(r, 4, s, d)  # the fit from 1 and 2 rows is exact (rotary tables are kept once)
    assert full > 10 * (2 * 4 * s * d * 4)  # a layer keeps far more than its input and output
    # checkpointing keeps the input leaf and the output only (fp32 both)
    assert kept_bytes(replica(checkpointing=True), 4, s, d) == 2 * 4 * s * d * 4
    bf16 = replica("bf16")  # bf16 copies of the weights are kept once per microbatch, whatever its rows
    assert kept_bytes(bf16, 4, s, d) == direct(bf16, 4, s, d) < full


def test_derived_capacity_from_free_memory(monkeypatch, caplog) -> None:
    r = replica()
    kept = kept_bytes(r, 4, 32, 64)
    state = 3 * sum(p.numel() * 4 for p in r.module.parameters())  # gradients and two Adam moments to come
    monkeypatch.setattr(sizing, "free_bytes", lambda device: (GIB + state + 3 * kept + 10, 8 * GIB))
    with caplog.at_level(logging.INFO, logger="gwtf.sizing"):
        figures = derive_capacity(r, 4, 32, 64, cap=8)
    assert (figures.capacity, figures.kept, figures.state, figures.margin) == (2, kept, state, GIB)
    assert "capacity 2 microbatches on cpu" in caplog.text and "kept per held microbatch" in caplog.text
    monkeypatch.setattr(sizing, "free_bytes", lambda device: (GIB + state + kept, 8 * GIB))
    with pytest.raises(UserError, match="does not fit"):
        derive_capacity(r, 4, 32, 64, cap=8)


def test_host_memory_reads_meminfo_within_the_cgroup_limit(tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    8000000 kB\n")
    assert host_memory(meminfo, tmp_path / "none") == (8_000_000 * 1024, 16_000_000 * 1024)
    (tmp_path / "memory.max").write_text(f"{4 * GIB}\n")
    (tmp_path / "memory.current").write_text(f"{3 * GIB}\n")
    assert host_memory(meminfo, tmp_path) == (GIB, 4 * GIB)
    (tmp_path / "memory.max").write_text("max\n")
    assert host_memory(meminfo, tmp_path)[0] == 8_000_000 * 1024


def test_relays_derive_their_capacity_unless_given(monkeypatch) -> None:
    from gwtf.runtime import joining
    from tests.support import InProcessSwarm
    from tests.test_swarm_inprocess import fast_swarm, run, small_config

    assert add_arguments_defaults()["capacity"] is None  # `gwtf join` derives it unless --capacity is given

    async def swarm_capacities(capacity):
        swarm = InProcessSwarm(small_config(steps=1, stages=2), settings=fast_swarm(), capacity=capacity)
        await swarm.start()
        try:
            await swarm.step()
            return [(n.replica.capacity, n.record().capacity) for n in swarm.relays.values()]
        finally:
            await swarm.close()

    # plenty of RAM for the debug model: the run's 4 microbatches per step
    assert run(swarm_capacities(None)) == [(4, 4), (4, 4)]

    def refuse(*args):
        raise AssertionError("derived although --capacity was given")

    monkeypatch.setattr(joining, "derive_capacity", refuse)
    assert run(swarm_capacities(3)) == [(3, 3), (3, 3)]


def add_arguments_defaults() -> dict:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return vars(parser.parse_args(["--initial-peers", "x", "--run", "r"]))


def test_memory_benchmark_measures_a_relay_stage() -> None:
    from gwtf.benchmarks.memory import stage_memory

    row = stage_memory("debug", torch.device("cpu"), 2, 32, 4 * GIB)
    assert row["params"] > 0 and row["optimizer_bytes"] == 2 * row["param_bytes"]  # AdamW's two moments, fp32
    fp32, ckpt = row["fp32"]["kept_bytes_per_microbatch"], row["fp32_ckpt"]["kept_bytes_per_microbatch"]
    assert ckpt == 2 * 2 * 32 * 64 * 4 < fp32  # checkpointing: the input and the output only
    free = 4 * GIB - row["param_bytes"]
    assert row["fp32"]["capacity"] == capacity_from(free, fp32, 3 * row["param_bytes"], GIB, 1 << 30)


def test_cuda_free_memory_counts_the_allocators_unused_blocks(monkeypatch) -> None:
    """The CUDA branch, with torch.cuda's readings faked (no GPU here): the driver's free bytes plus the blocks the
    caching allocator reserved and does not use (a probe's freed tensors stay reserved); a margin of 10 % of the
    device, at least 1 GiB."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * GIB)
    assert sizing.free_bytes(gpu) == (11 * GIB, 80 * GIB)
    assert sizing.margin_bytes(gpu, 11 * GIB, 80 * GIB) == 8 * GIB
    assert sizing.margin_bytes(gpu, 1 * GIB, 6 * GIB) == GIB
    assert sizing.margin_bytes(torch.device("cpu"), 8 * GIB, 16 * GIB) == 2 * GIB  # a quarter of the free RAM
