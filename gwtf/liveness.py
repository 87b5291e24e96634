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
import functools
import time

from gwtf.errors import PeerError
from gwtf.transport import Message, Transport

PROBE_TIMEOUT_S = 3.0
RECHECK_S = 0.2  # a GONE answer is checked once more after this long


class Answer(enum.Enum):
    UP = "up"  # it replied or refused
    GONE = "gone"  # the connection was refused or reset: nothing listens there
    SILENT = "silent"  # no answer within the timeout


async def probe(transport: Transport, peer: str, timeout: float = PROBE_TIMEOUT_S) -> Answer:
    """UP, GONE or SILENT; GONE only when a second try, `RECHECK_S` later, fails as the first did (one reset
    connection between two live peers is not a crash)."""
    answer = await _probe_once(transport, peer, timeout)
    if answer is Answer.GONE:
        await asyncio.sleep(RECHECK_S)
        answer = await _probe_once(transport, peer, timeout)
    return answer


async def _probe_once(transport: Transport, peer: str, timeout: float) -> Answer:
    msg = Message(kind="release", run_id=transport.run_id, microbatch_id=-1, meta={"origin": "", "attempt": -1})
    try:
        await transport.call(peer, "release", msg, timeout)
    except PeerError as exc:
        text = str(exc)
        if text.startswith(("rejected:", "handler ")):  # transport.Transport: the peer's own error frame
            return Answer.UP
        return Answer.SILENT if text.startswith("timeout") else Answer.GONE
    return Answer.UP


async def _those(ask, peers: set[str], timeout: float, answer: Answer) -> set[str]:
    """The peers among `peers` whose probe (`ask(peer, timeout)`, all at once) gave `answer`."""
    order = sorted(peers)
    answers = await asyncio.gather(*(ask(p, timeout) for p in order))
    return {p for p, a in zip(order, answers, strict=True) if a is answer}


async def gone(transport: Transport, peers: set[str], timeout: float = PROBE_TIMEOUT_S) -> set[str]:
    """The peers among `peers` that are certainly gone (probed concurrently, bounded by `timeout`)."""
    return await _those(functools.partial(probe, transport), peers, timeout, Answer.GONE)


async def answering(transport: Transport, peers: set[str], timeout: float = PROBE_TIMEOUT_S) -> set[str]:
    """The peers among `peers` that answered (UP): silent ones are left out too, for choices that must not count on
    a peer that may be gone (a joiner counting a stage's replicas)."""
    return await _those(functools.partial(probe, transport), peers, timeout, Answer.UP)


class ProbeCache:
    """Probes shared by the concurrent waits of one node: a data node with many microbatches out probes the replicas
    of every late leg once a second, and legs share replicas. An answer is reused for `ttl` seconds, and a probe
    still under way is awaited rather than sent again, so each peer is probed at most once per `ttl`."""

    def __init__(self, transport: Transport, ttl: float = 0.5) -> None:
        self.transport, self.ttl = transport, ttl
        self._answers: dict[str, tuple[float, Answer]] = {}  # peer -> (monotonic time of the answer, answer)
        self._pending: dict[str, asyncio.Future[Answer]] = {}
        self.sent = 0  # probes actually sent (for tests and logs)

    async def probe(self, peer: str, timeout: float = PROBE_TIMEOUT_S) -> Answer:
        hit = self._answers.get(peer)
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        pending = self._pending.get(peer)
        if pending is None:
            pending = asyncio.ensure_future(self._send(peer, timeout))
            self._pending[peer] = pending
        return await asyncio.shield(pending)

    async def _send(self, peer: str, timeout: float) -> Answer:
        self.sent += 1
        try:
            answer = await probe(self.transport, peer, timeout)
        finally:
            self._pending.pop(peer, None)
        self._answers[peer] = (time.monotonic(), answer)
        if len(self._answers) > 4096:  # bounded: forget the oldest answers
            for old in sorted(self._answers, key=lambda p: self._answers[p][0])[:1024]:
                del self._answers[old]
        return answer

    async def gone(self, peers: set[str], timeout: float = PROBE_TIMEOUT_S) -> set[str]:
        """As `gone`, through the cache."""
        return await _those(self.probe, peers, timeout, Answer.GONE)
