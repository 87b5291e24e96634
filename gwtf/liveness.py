"""Is a peer there at all? One call answers it faster than a DHT record expires.

A crashed node's DHT record outlives it by up to its TTL, so a view from the DHT still lists it for seconds; waits
that count on it (a joiner choosing its stage, an averaging leader waiting for contributions) would stall or choose
wrong. A probe is a no-op `release` call (nothing is held for microbatch -1): a reply or a refusal (unknown
handler, a validation error) is the peer's own answer, so it is up; a reset or refused connection means it is gone;
silence within the timeout proves nothing either way (a loaded peer can be slow).
"""

from __future__ import annotations

import asyncio
import enum

from gwtf.errors import PeerError
from gwtf.transport import Message, Transport

PROBE_TIMEOUT_S = 3.0


class Answer(enum.Enum):
    UP = "up"  # it replied or refused
    GONE = "gone"  # the connection was refused or reset: nothing listens there
    SILENT = "silent"  # no answer within the timeout


async def probe(transport: Transport, peer: str, timeout: float = PROBE_TIMEOUT_S) -> Answer:
    msg = Message(kind="release", run_id=transport.run_id, microbatch_id=-1, meta={"origin": "", "attempt": -1})
    try:
        await transport.call(peer, "release", msg, timeout)
    except PeerError as exc:
        text = str(exc)
        if text.startswith(("rejected:", "handler ")):  # transport.Transport: the peer's own error frame
            return Answer.UP
        return Answer.SILENT if text.startswith("timeout") else Answer.GONE
    return Answer.UP


async def gone(transport: Transport, peers: set[str], timeout: float = PROBE_TIMEOUT_S) -> set[str]:
    """The peers among `peers` that are certainly gone (probed concurrently, bounded by `timeout`)."""
    order = sorted(peers)
    answers = await asyncio.gather(*(probe(transport, p, timeout) for p in order))
    return {p for p, a in zip(order, answers, strict=True) if a is Answer.GONE}
