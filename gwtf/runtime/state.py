"""A stage's state (parameters and optimizer moments) downloaded from live replicas, in chunks spread over the
donors, all at one version: used by joiners, replicas catching up, shadow holders, data nodes and `gwtf export`."""

from __future__ import annotations

import asyncio

import torch

from gwtf.errors import BadMessage
from gwtf.stage import STATE_CHUNK
from gwtf.transport import Message


async def fetch_state(call, run_id: str, donors: list[str], names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """A stage's parameters and optimizer state by name, in chunks spread over the donors, all at one version.
    `call(donor, message) -> reply` sends a get_state request."""
    chunks = [names[i : i + STATE_CHUNK] for i in range(0, len(names), STATE_CHUNK)]
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
            "grad_norm": first.get("grad_norm")}  # fmt: skip
    return tensors, meta
