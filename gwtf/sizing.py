"""Sizes in bytes: how long a transfer may take, how to cut a set of tensors into byte-sized pieces, and how many
microbatches a relay's device memory holds.

Every wait on a transfer is a fixed floor (a round trip, the peer's queue) plus the transfer's bytes over the run's
floor bandwidth: the slowest link a run is meant to carry (`iteration.floor_bandwidth_mbps`). A fixed number of
seconds is either far too long for a debug model or far too short for a 1.5b stage (a 256 MiB activation takes 14 s
at 150 Mbit/s).

A relay's capacity (`gwtf join` without `--capacity`): how many microbatches its device holds between their forward
and their backward. What one held microbatch keeps is measured, not computed from a formula: a probe forward of the
run's shape through the replica's own forward (its precision, activation checkpointing, attention kernel and LoRA
adapters included) counts the bytes autograd saves for the backward plus the input and output the replica keeps.
A formula (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models") depends on which
attention kernel runs and what autocast copies, and would drift from the code it describes (in bf16 every held
microbatch keeps its own bf16 copies of the weights). The device's free bytes after the stage is built, less a
margin and the gradients and Adam moments still to come, divided by the kept bytes, give the capacity; it never
exceeds the run's microbatches per step (a relay never holds more than one iteration's microbatches at once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gwtf.errors import UserError

if TYPE_CHECKING:
    from gwtf.stage import StageReplica

log = logging.getLogger(__name__)
MIB = 1 << 20
GIB = 1 << 30


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


# --- a relay's capacity from its device's memory ----------------------------------------------------------------

CUDA_MARGIN = 0.10  # of the device's total memory (at least 1 GiB): the CUDA context, the caching allocator's
# fragmentation, cuBLAS workspaces
HOST_MARGIN = 0.25  # of the available RAM (at least 1 GiB): a volunteer's machine runs other programs, and the host
# copies of averaging buckets, received frames and served state live there too
MIN_MARGIN = GIB


@dataclass(frozen=True)
class CapacityFigures:
    """How a relay's capacity was derived (every size in bytes)."""

    device: str
    kept: int  # one held microbatch, measured
    free: int  # free on the device once the stage is built
    total: int  # the device's memory (RAM for the CPU)
    state: int  # still to come: gradients and Adam moments of the trainable parameters
    margin: int
    cap: int  # the run's microbatches per step
    capacity: int

    def line(self) -> str:
        return (f"capacity {self.capacity} microbatches on {self.device}: {self.free / MIB:.0f} MiB free of "
                f"{self.total / MIB:.0f}, less a {self.margin / MIB:.0f} MiB margin and {self.state / MIB:.0f} MiB of "
                f"gradients and Adam moments to come, over {self.kept / MIB:.1f} MiB kept per held microbatch "
                f"(one more kept as working room; at most {self.cap}, the run's microbatches per step)")  # fmt: skip


def capacity_from(free: int, kept: int, state: int, margin: int, cap: int) -> int:
    """Microbatches that fit: (free - margin - state) bytes over `kept` per microbatch, one of them left as the
    working room of the forward or backward in flight (its transient tensors), at most `cap`. UserError when not
    even one fits: the relay would run out of memory at its first microbatch."""
    room = free - margin - state
    fits = room // max(kept, 1) - 1
    if fits < 1:
        raise UserError(
            f"one microbatch keeps {kept / MIB:.0f} MiB and {max(room, 0) / MIB:.0f} MiB are left on this device "
            f"after the stage, its optimizer state and a {margin / MIB:.0f} MiB margin: it does not fit; the run "
            "needs train.activation_checkpointing, bf16, a smaller microbatch, or a device with more memory "
            "(or give --capacity to try anyway)"
        )
    return int(min(fits, cap))


def margin_bytes(device: torch.device, free: int, total: int) -> int:
    if device.type == "cuda":
        return max(MIN_MARGIN, int(CUDA_MARGIN * total))
    return max(MIN_MARGIN, int(HOST_MARGIN * free))


def free_bytes(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of `device`'s memory: on CUDA the driver's free memory plus the blocks the caching
    allocator holds unused; on the CPU the available RAM, within the container's memory limit if there is one."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached), int(total)
    return host_memory()


def host_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> tuple[int, int]:
    """(available, total) bytes of RAM: /proc/meminfo's MemAvailable (what can be allocated without swapping), cut
    to a cgroup's limit less its usage (a container sees the host's meminfo); psutil where there is no /proc."""
    if meminfo.is_file():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        available, total = (int(fields[k].split()[0]) * 1024 for k in ("MemAvailable", "MemTotal"))
    else:
        try:
            import psutil
        except ImportError as exc:
            raise UserError(
                "cannot read this machine's free memory (no /proc/meminfo, no psutil): give --capacity"
            ) from exc
        vm = psutil.virtual_memory()
        available, total = int(vm.available), int(vm.total)
    limit = _cgroup_room(cgroup)
    if limit is not None:
        available, total = min(available, limit[0]), min(total, limit[1])
    return available, total


def _cgroup_room(root: Path) -> tuple[int, int] | None:
    """(limit - usage, limit) of this process's memory cgroup (v2, else v1), None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # fmt: skip
        try:
            limit_text = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 1 << 60:  # unlimited
            return None
        return max(int(limit_text) - usage, 0), int(limit_text)
    return None


def _storage(t: torch.Tensor) -> tuple[tuple[str, int], int]:
    """(a key of `t`'s storage, its bytes): views of one storage are kept once."""
    try:
        st = t.untyped_storage()
        return (str(t.device), st.data_ptr()), st.nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor without a plain storage (a subclass)
        return (str(t.device), id(t)), t.numel() * t.element_size()


def saved_bytes(run: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor, exclude: Iterable[torch.Tensor]) -> int:
    """Bytes a forward `run(inp)` keeps until its backward: every storage autograd saves for the backward (once
    each), plus `inp` and the output, less the storages of `exclude` (the module's own weights, kept anyway).
    Under activation checkpointing the checkpoint's own hooks take what it saves (the innermost hooks win), so
    only its input and output count, as they should."""
    skip = {_storage(t)[0] for t in exclude}
    kept: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage(t)
        if key not in skip:
            kept[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run(inp)
    for t in (inp, out):
        key, nbytes = _storage(t)
        kept[key] = nbytes
    return sum(kept.values())


def kept_bytes(replica: StageReplica, batch: int, seq_len: int, d_model: int) -> int:
    """Bytes one held microbatch of `batch` x `seq_len` keeps on `replica`'s device, measured by probe forwards
    through the replica's own forward (nothing is held afterwards). Kept bytes are linear in the batch, with a part
    that is not (bf16 copies of the weights): probes at 1 and 2 rows give both, so that a large microbatch is not
    run in full (a 1.5b stage on a CPU)."""

    def probe(rows: int) -> int:
        hidden = torch.randn(rows, seq_len, d_model).to(replica.wire)
        inp = replica._input(hidden)
        params = [*replica.module.parameters(), *replica.module.buffers()]
        return saved_bytes(lambda x: replica._run(("capacity-probe", -1, 0), x), inp, params)

    if batch <= 2:
        return probe(batch)
    one, two = probe(1), probe(2)
    return one + (batch - 1) * (two - one)


def derive_capacity(replica: StageReplica, batch: int, seq_len: int, d_model: int, cap: int) -> CapacityFigures:
    """A relay's capacity from its device's memory once its stage is built (in its compute thread); logged in one
    line with the figures it came from."""
    device = replica.device
    kept = kept_bytes(replica, batch, seq_len, d_model)
    free, total = free_bytes(device)
    trainable = sum(p.numel() * p.element_size() for p in replica.trainable())
    moments = 0 if replica.optimizer.state else 2 * trainable  # Adam's, created at the first step
    state = trainable + moments  # gradients accumulate in place of None after each step
    margin = margin_bytes(device, free, total)
    capacity = capacity_from(free, kept, state, margin, cap)
    figures = CapacityFigures(str(device), kept, free, total, state, margin, cap, capacity)
    log.info("stage %d: %s", replica.index, figures.line())
    return figures
