"""Receive buffers that are used again: a frame's body lands in a pooled buffer instead of fresh memory.

A fresh buffer of tens of MB is fresh pages: the kernel faults each 4 KiB page in on first write, which measured
here (a 2-core VM) costs as much as reading the bytes off the socket (~1.8 GB/s against ~9 GB/s for writing memory
that is already mapped). Messages of a run come in few sizes (the same activation shape microbatch after
microbatch), so a body buffer is taken by its exact size from the pool and goes back to it when the last tensor
decoded from it is freed (a finalizer on the buffer, which every tensor viewing it keeps alive); a handler may keep
its tensors as long as it likes. On a node that computes on a CUDA device the buffers are page-locked (pinned), so
copies to the device run by DMA without a staging copy; CPU nodes never pin.

Idle buffers are bounded in total bytes (oldest dropped first), so a burst of unusual sizes costs memory only for
as long as it lasts; bodies under MIN_POOLED_BYTES come from malloc, which is cheap at that size.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch

MIN_POOLED_BYTES = 64 << 10
DEFAULT_MAX_IDLE_BYTES = 256 << 20


class BufferPool:
    """Writable byte buffers (numpy uint8 arrays) by exact size; `take` one, and it returns by itself once freed."""

    def __init__(self, max_idle_bytes: int = DEFAULT_MAX_IDLE_BYTES, pin_memory: bool = False) -> None:
        if max_idle_bytes < 0:
            raise ValueError(f"max_idle_bytes must be >= 0, got {max_idle_bytes}")
        self.max_idle_bytes = max_idle_bytes
        # Pinning needs a CUDA driver; asked for on a machine without one it would fail at the first frame.
        self.pin_memory = bool(pin_memory and torch.cuda.is_available())
        self._idle: OrderedDict[int, list[torch.Tensor]] = OrderedDict()  # size -> buffers, least recently used first
        self._idle_bytes = 0
        self._lock = threading.Lock()  # a finalizer may run in a worker thread (one that dropped the last tensor)
        self.hits = self.misses = 0  # for tests and metrics: buffers reused, buffers allocated

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(self, nbytes: int) -> Any:
        """A writable uint8 numpy array of `nbytes` (contents undefined); pooled from MIN_POOLED_BYTES on."""
        if nbytes < MIN_POOLED_BYTES:
            return torch.empty(nbytes, dtype=torch.uint8).numpy()
        base = self._reuse(nbytes)
        if base is None:
            base = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
        view = base.numpy()  # a fresh array object per use: its death (no tensor left on it) returns `base`
        weakref.finalize(view, self._give_back, base)
        return view

    def _reuse(self, nbytes: int) -> torch.Tensor | None:
        with self._lock:
            free = self._idle.get(nbytes)
            if not free:
                self.misses += 1
                return None
            base = free.pop()
            if not free:
                del self._idle[nbytes]
            self._idle_bytes -= nbytes
            self.hits += 1
            return base

    def _give_back(self, base: torch.Tensor) -> None:
        nbytes = base.numel()
        with self._lock:
            if nbytes > self.max_idle_bytes:
                return
            self._idle.setdefault(nbytes, []).append(base)
            self._idle.move_to_end(nbytes)
            self._idle_bytes += nbytes
            while self._idle_bytes > self.max_idle_bytes:  # drop the least recently returned size's buffers first
                size, free = next(iter(self._idle.items()))
                free.pop(0)
                self._idle_bytes -= size
                if not free:
                    del self._idle[size]

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()
            self._idle_bytes = 0
