"""Where a joining relay goes: the pipeline stage where it adds the most throughput."""

from __future__ import annotations

from gwtf.membership import NodeRecord


def choose_stage(nodes: dict[str, NodeRecord], n_stages: int) -> int:
    """An empty stage first, then the stage with the fewest microbatches per second (a relay computes one at a
    time: 1 / its compute time), ties to the lowest index.

    A relay that has not measured its compute time yet (joining, or serving but idle so far) counts at the median
    of the measured ones, not at zero seconds: that would make its stage look infinitely fast and starve it.
    """
    relays = [r for r in nodes.values() if r.role == "relay" and r.status in ("joining", "serving")]
    measured = sorted(r.compute_s for r in relays if r.compute_s > 0)
    typical = measured[len(measured) // 2] if measured else 1.0
    rate = {k: 0.0 for k in range(1, n_stages + 1)}
    count = dict.fromkeys(rate, 0)
    for r in relays:
        if r.stage in rate:
            rate[r.stage] += 1.0 / (r.compute_s if r.compute_s > 0 else typical)
            count[r.stage] += 1
    return min(rate, key=lambda k: (count[k] > 0, rate[k], k))
