"""Link emulation: delays between regions from the measured latency and bandwidth matrix
(gwtf/resources/regions.json), with the bandwidth of a directed link shared by the transfers on it."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import time
from pathlib import Path
from typing import Any


def _load_regions(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return json.loads(importlib.resources.files("gwtf.resources").joinpath("regions.json").read_text())
    return json.loads(Path(path).read_text())


class _LinkState:
    """Transfers in flight on one directed link, sharing its bandwidth equally (processor sharing)."""

    def __init__(self, bandwidth: float) -> None:
        self.bandwidth = bandwidth  # bytes per (scaled) second
        self.remaining: dict[int, float] = {}
        self.updated = time.monotonic()
        self.changed = asyncio.Event()

    def advance(self) -> None:
        now = time.monotonic()
        if self.remaining:
            share = (now - self.updated) * self.bandwidth / len(self.remaining)
            for key in self.remaining:
                self.remaining[key] -= share
        self.updated = now

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class LinkEmulator:
    """Delays deliveries by latency + bytes / bandwidth between regions; `time_scale` shrinks every delay.

    Links are symmetric as in the regions file; an intra-region link (or an unknown region) gets 1 ms and
    2048 MB/s. Transfers on one directed link that overlap in time share its bandwidth equally.
    """

    def __init__(
        self,
        regions_json: str | Path | None = None,
        time_scale: float = 1.0,
        intra_latency_ms: float = 1.0,
        intra_bandwidth_mb_per_s: float = 2048.0,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        data = _load_regions(regions_json)
        self.regions: list[str] = list(data["regions"])
        self.time_scale = time_scale
        self._intra = (intra_latency_ms / 1000, intra_bandwidth_mb_per_s * 2**20)
        self._links: dict[tuple[str, str], tuple[float, float]] = {}
        for link in data["links"]:
            cost = (link["latency_ms"] / 1000, link["bandwidth_mb_per_s"] * 2**20)
            self._links[(link["a"], link["b"])] = self._links[(link["b"], link["a"])] = cost
        self._states: dict[tuple[str | None, str | None], _LinkState] = {}
        self._next_id = 0

    def link(self, src: str | None, dst: str | None) -> tuple[float, float]:
        """(latency in seconds, bandwidth in bytes/s) of the directed link, unscaled."""
        if src is None or dst is None or src == dst:
            return self._intra
        return self._links.get((src, dst), self._intra)

    async def delay(self, src_region: str | None, dst_region: str | None, nbytes: int) -> None:
        latency, bandwidth = self.link(src_region, dst_region)
        await asyncio.sleep(latency * self.time_scale)
        if nbytes > 0:
            await self._transfer((src_region, dst_region), bandwidth / self.time_scale, nbytes)

    async def _transfer(self, key: tuple[str | None, str | None], bandwidth: float, nbytes: int) -> None:
        state = self._states.setdefault(key, _LinkState(bandwidth))
        tid, self._next_id = self._next_id, self._next_id + 1
        state.advance()
        state.remaining[tid] = float(nbytes)
        state.notify()
        try:
            while True:
                state.advance()
                left = state.remaining[tid]
                if left <= 0:
                    return
                eta = left * len(state.remaining) / state.bandwidth
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.changed.wait(), eta)
        finally:
            state.advance()
            del state.remaining[tid]
            state.notify()
