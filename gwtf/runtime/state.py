"""A stage's state (parameters and optimizer moments) downloaded from live replicas, in chunks spread over the
donors, all at one version: used by joiners, replicas catching up, shadow holders, data nodes and `gwtf export`."""

from __future__ import annotations

import asyncio

import torch

from gwtf.errors import BadMessage
from gwtf.runtime.config import IterationConfig
from gwtf.sizing import chunk_by_bytes, transfer_timeout
from gwtf.stage import STATE_CHUNK_BYTES, STATE_CHUNK_PARAMS
from gwtf.transport import Message


def state_chunks(names: list[str], sizes: dict[str, int] | None = None) -> list[list[str]]:
    """`names` cut into the requests of a state download: each reply at most STATE_CHUNK_BYTES (by `sizes`, each
    name's state bytes; a parameter larger than that alone) and STATE_CHUNK_PARAMS parameters."""
    by_bytes = [sizes.get(n, 0) if sizes else 0 for n in names]
    return [[names[i] for i in r] for r in chunk_by_bytes(by_bytes, STATE_CHUNK_BYTES, STATE_CHUNK_PARAMS)]


def state_wait(iteration: IterationConfig, sizes: dict[str, int] | None, names: list[str], donors: int) -> float:
    """How long one call of a state download may take: the chunks from one donor share its link, so each waits for
    the donor's whole share of `names` (by `sizes`, each name's state bytes) at the run's floor bandwidth, after an
    iteration's timeout. A SmolLM2 stage of 10 layers is 420 MB: 67 s from one donor at 50 Mbit/s."""
    share = sum((sizes or {}).get(n, 0) for n in names) // max(donors, 1)
    return transfer_timeout(iteration.iteration_timeout, share, iteration.floor_bandwidth_mbps)


async def fetch_state(
    call, run_id: str, donors: list[str], names: list[str], sizes: dict[str, int] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """A stage's parameters and optimizer state by name, in chunks spread over the donors, all at one version.
    `call(donor, message) -> reply` sends a get_state request; `sizes`: each name's state bytes (chunks by bytes)."""
    chunks = state_chunks(names, sizes)
    replies = await asyncio.gather(
        *(call(donors[i % len(donors)], Message(kind="state", run_id=run_id, meta={"names": chunk}))
          for i, chunk in enumerate(chunks))
    )  # fmt: skip
    versions = {r.meta["version"] for r in replies}
    if len(versions) != 1:
        raise BadMessage(f"donors are at different versions {sorted(versions)}")
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for r in replies:
        tensors.update(zip(r.meta["keys"], r.tensors))
        steps.update(r.meta["steps"])
    missing = [n for n in names if f"param/{n}" not in tensors]
    if missing:
        raise BadMessage(f"the donors' state lacks {len(missing)} parameters, e.g. {missing[0]}")
    first = replies[0].meta
    meta = {"version": versions.pop(), "steps": steps, "lr_scale": first.get("lr_scale", 1.0),
            "grad_norm": first.get("grad_norm"), "boost": first.get("boost")}  # fmt: skip
    return tensors, meta
