"""What a router sees of the live swarm: membership records turned into a `SwarmView`."""

from __future__ import annotations

from collections.abc import Callable

from gwtf.membership import NodeRecord, serving
from gwtf.routing.base import DataInfo, RelayInfo, SwarmView
from gwtf.runtime.spec import RunSpec


def activation_bytes(model, microbatch_size: int) -> int:
    """Bytes of one microbatch's activations between stages (fp32 hidden states): the routers' `size`."""
    return microbatch_size * model.seq_len * model.d_model * 4


def view_builder(spec: RunSpec, microbatch_size: int) -> Callable[[dict[str, NodeRecord], int | None], SwarmView]:
    """Turn live membership records into what a router needs; only serving nodes at the iteration's version
    carry traffic (a replica that is behind catches up first). Iteration None: every serving node."""
    m = spec.model
    size = activation_bytes(m, microbatch_size)

    def build(nodes: dict[str, NodeRecord], iteration: int | None) -> SwarmView:
        relays = {
            p: RelayInfo(p, r.stage, r.capacity, max(r.compute_s, 1e-4), r.region)
            for p, r in serving(nodes, "relay").items()
            if iteration is None or r.state_version == iteration
        }
        data = {p: DataInfo(p, r.region) for p, r in serving(nodes, "data").items()}
        return SwarmView(m.n_stages, relays, data, size)

    return build
