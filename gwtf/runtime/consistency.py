"""Replicas identical, checked: after every step each replica of a stage replies `stepped` with a hash of its
weights; a data node compares the hashes of each stage and has a replica whose hash differs from its stage's
majority download the state of a majority replica (`resync`), before the next iteration routes through it.

Replicas of a stage step bit-identical averaged gradients from bit-identical weights, so their hashes agree unless
something went wrong: a replica left out of a round that stepped on its own, a corrupted download, or replicas on
different devices (CUDA's AdamW kernels are not bit-identical with the CPU's). A warning is not enough there: a
joiner or a CheckFree neighbour trusts any replica's state, so the odd one is overwritten.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

from gwtf.transport import Message

log = logging.getLogger(__name__)


def majority(hashes: dict[str, str]) -> str:
    """The hash most replicas hold; a tie goes to the hash of the lowest peer id among the tied ones (the averaging
    leader's, whose result every member stepped: with two replicas there is no majority to ask)."""
    counts = collections.Counter(hashes.values())
    top = max(counts.values())
    tied = {h for h, c in counts.items() if c == top}
    return next(hashes[p] for p in sorted(hashes) if hashes[p] in tied)


def diverged(digests: dict[str, tuple[int, str]]) -> dict[str, tuple[str, list[str]]]:
    """From {replica: (stage, weights hash)}: {replica whose hash differs from its stage's majority: (the majority
    hash, the replicas that hold it)}."""
    by_stage: dict[int, dict[str, str]] = {}
    for peer, (stage, digest) in digests.items():
        by_stage.setdefault(stage, {})[peer] = digest
    out = {}
    for hashes in by_stage.values():
        best = majority(hashes)
        donors = sorted(p for p, h in hashes.items() if h == best)
        out.update({p: (best, donors) for p, h in hashes.items() if h != best})
    return out


def reported(iteration: int, replies: dict[str, Message], stages: dict[str, int]) -> dict[str, tuple[int, str]]:
    """{replica: (its stage, the weight hash its `stepped` reply for `iteration` carries)}; a reply of another version
    (stale) or without a hash is left out."""
    return {
        p: (stages[p], r.meta["hash"])
        for p, r in replies.items()
        if p in stages and isinstance(r.meta.get("hash"), str) and r.meta.get("version") == iteration + 1
    }


def weight_hashes(iteration: int, replies: dict[str, Message], stages: dict[str, int]) -> dict[int, tuple[int, int]]:
    """{stage: (replicas whose `stepped` reply for `iteration` carries a weight hash, distinct hashes among them)};
    one distinct hash: the stage's replicas are identical (before any resync)."""
    seen: dict[int, list[str]] = {}
    for stage, digest in reported(iteration, replies, stages).values():
        seen.setdefault(stage, []).append(digest)
    return {stage: (len(hashes), len(set(hashes))) for stage, hashes in sorted(seen.items())}


async def resync_diverged(
    call: Callable[[str, Message], Awaitable[Message]],
    run_id: str,
    iteration: int,
    replies: dict[str, Message],
    stages: dict[str, int],
) -> dict[str, str]:
    """Compare the `stepped` replies' hashes per stage; have each odd replica resynchronise from its stage's
    majority and wait for it (every call bounded by `call`). {peer: its hash afterwards, or why it failed}."""
    digests = reported(iteration, replies, stages)
    odd = diverged(digests)
    if not odd:
        return {}
    for peer, (best, donors) in sorted(odd.items()):
        log.warning("iteration %d: stage %d replica %s has weights %s, the majority %s (%d replicas): resyncing",
                    iteration, stages[peer], peer[:8], digests[peer][1][:8], best[:8], len(donors))  # fmt: skip
    msgs = {p: Message(kind="resync", run_id=run_id, iteration=iteration + 1, meta={"donors": d, "hash": h})
            for p, (h, d) in odd.items()}  # fmt: skip
    results = await asyncio.gather(*(call(p, m) for p, m in msgs.items()), return_exceptions=True)
    out = {}
    for peer, r in zip(msgs, results, strict=True):
        if isinstance(r, BaseException):
            log.warning("iteration %d: replica %s did not resync (%s)", iteration, peer[:8], r)
            out[peer] = f"failed: {r}"
        else:
            out[peer] = str(r.meta.get("hash"))
    return out
