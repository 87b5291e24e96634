"""Sizes in bytes: how long a transfer may take, and how to cut a set of tensors into byte-sized pieces.

Every wait on a transfer is a fixed floor (a round trip, the peer's queue) plus the transfer's bytes over the run's
floor bandwidth: the slowest link a run is meant to carry (`iteration.floor_bandwidth_mbps`). A fixed number of
seconds is either far too long for a debug model or far too short for a 1.5b stage (a 256 MiB activation takes 14 s
at 150 Mbit/s).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIB = 1 << 20


def transfer_s(nbytes: int, floor_mbps: float) -> float:
    """Seconds `nbytes` take at `floor_mbps` megabits per second."""
    return 8.0 * max(nbytes, 0) / (floor_mbps * 1e6)


def transfer_timeout(fixed_s: float, nbytes: int, floor_mbps: float) -> float:
    """A wait on a transfer of `nbytes`: the fixed floor plus its time at the floor bandwidth."""
    return fixed_s + transfer_s(nbytes, floor_mbps)


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def chunk_by_bytes(sizes: Sequence[int], max_bytes: int, max_items: int) -> list[range]:
    """Consecutive index ranges over items of `sizes` bytes, each at most `max_bytes` (an item larger than that
    alone) and `max_items` long: the pieces a transfer is cut into."""
    chunks, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (total + size > max_bytes or i - start >= max_items):
            chunks.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        chunks.append(range(start, len(sizes)))
    return chunks
