"""Link figures and the GWTF cost model (design.md section 5).

The cost of sending one microbatch over link (i, j), forward and backward together, is

    d_ij = (c_i + c_j) / 2 + (lat_ij + lat_ji) / 2 + 2 * size / (bw_ij + bw_ji)

Along a path data -> r_1 -> ... -> r_S -> data every relay's compute is counted once (half on each side), so a
path costs c_data + sum(c_r) + sum of the link terms. Link figures come from the region matrix in
gwtf/resources/regions.json, overridden per peer pair by measurements.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from gwtf.errors import UserError

INTRA_LATENCY_S = 1e-3
INTRA_BANDWIDTH_BPS = 2048.0 * 2**20
MB = 2**20


@dataclass(frozen=True)
class RegionMatrix:
    """Symmetric one-way latency (s) and bandwidth (bytes/s) between named regions."""

    regions: tuple[str, ...]
    latency: dict[tuple[str, str], float]
    bandwidth: dict[tuple[str, str], float]

    def figures(self, a: str | None, b: str | None) -> tuple[float, float]:
        """(latency_s, bandwidth_Bps) between two regions; same or unknown-to-itself region is intra-region."""
        if a == b:
            return INTRA_LATENCY_S, INTRA_BANDWIDTH_BPS
        if a is None or b is None or (a, b) not in self.latency:
            return self.median
        return self.latency[(a, b)], self.bandwidth[(a, b)]

    @property
    def median(self) -> tuple[float, float]:
        # Unknown regions get a typical long-distance link, not the optimistic intra-region one.
        lat = sorted(self.latency.values()) or [INTRA_LATENCY_S]
        bw = sorted(self.bandwidth.values()) or [INTRA_BANDWIDTH_BPS]
        return lat[len(lat) // 2], bw[len(bw) // 2]


@lru_cache(maxsize=1)
def load_regions() -> RegionMatrix:
    """The region link matrix shipped with gwtf (a copy of shared/data/regions.json)."""
    text = resources.files("gwtf.resources").joinpath("regions.json").read_text()
    return parse_regions(json.loads(text))


def parse_regions(data: dict) -> RegionMatrix:
    try:
        regions = tuple(data["regions"])
        latency: dict[tuple[str, str], float] = {}
        bandwidth: dict[tuple[str, str], float] = {}
        for link in data["links"]:
            a, b = link["a"], link["b"]
            lat, bw = float(link["latency_ms"]) / 1e3, float(link["bandwidth_mb_per_s"]) * MB
            if lat < 0 or bw <= 0:
                raise ValueError(f"bad figures for {a}-{b}")
            latency[(a, b)] = latency[(b, a)] = lat
            bandwidth[(a, b)] = bandwidth[(b, a)] = bw
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"region link data is malformed ({exc}); expected regions.json's layout") from exc
    return RegionMatrix(regions, latency, bandwidth)


@dataclass
class LinkModel:
    """Latency and bandwidth between peers: by region, unless a peer pair has a measured override."""

    matrix: RegionMatrix = field(default_factory=load_regions)
    regions: dict[str, str | None] = field(default_factory=dict)
    measured: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)

    def set_region(self, peer: str, region: str | None) -> None:
        self.regions[peer] = region

    def measure(self, a: str, b: str, latency_s: float, bandwidth_Bps: float) -> None:
        """Record a measured one-way figure for a -> b (directional; the cost model symmetrises)."""
        if latency_s < 0 or bandwidth_Bps <= 0:
            raise ValueError(f"measured link {a}->{b} must have latency >= 0 and bandwidth > 0")
        self.measured[(a, b)] = (latency_s, bandwidth_Bps)

    def _figures(self, a: str, b: str) -> tuple[float, float]:
        hit = self.measured.get((a, b))
        if hit is not None:
            return hit
        return self.matrix.figures(self.regions.get(a), self.regions.get(b))

    def latency_s(self, a: str, b: str) -> float:
        return self._figures(a, b)[0]

    def bandwidth_Bps(self, a: str, b: str) -> float:
        return self._figures(a, b)[1]

    def link_term(self, a: str, b: str, size: int) -> float:
        """The link part of d_ab: (lat_ab + lat_ba)/2 + 2*size/(bw_ab + bw_ba)."""
        lat_ab, bw_ab = self._figures(a, b)
        lat_ba, bw_ba = self._figures(b, a)
        return (lat_ab + lat_ba) / 2 + 2 * size / (bw_ab + bw_ba)


def link_cost(c_i: float, c_j: float, lat_ij: float, lat_ji: float, bw_ij: float, bw_ji: float, size: int) -> float:
    """d_ij for one microbatch of `size` activation bytes (seconds)."""
    return (c_i + c_j) / 2 + (lat_ij + lat_ji) / 2 + 2 * size / (bw_ij + bw_ji)
