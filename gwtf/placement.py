"""Where a joining relay goes: the pipeline stage where it adds the most throughput, counting the volunteers that
announced their choice and are still loading, so that volunteers arriving together spread over the stages.

    stage = await place_volunteer(membership, peer_id, n_stages, live_nodes)   # gwtf join without --stage

A volunteer announces its choice (a DHT record with a short time to live, Membership.announce_choice) before it
loads, waits SETTLE_S for the others arriving with it to announce theirs, then takes its place in the order of the
announcements (time, then peer id): every volunteer computes that same order from the same announcements, so the
first takes the emptiest stage, the second the emptiest stage counting the first, and so on (design.md section 4).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gwtf.membership import Membership, NodeRecord

log = logging.getLogger(__name__)

SETTLE_S = 2.0  # a volunteer waits this long after announcing, for the volunteers arriving with it to announce
CHOICE_TTL_S = 60.0  # an announced choice covers the volunteer's loading, until its own record says "joining"


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


def _announced(peer: str, stage: int) -> NodeRecord:
    """An announced volunteer as placement counts it: a relay of `stage` that is joining (not measured yet)."""
    return NodeRecord(peer, "relay", stage, "joining", 0, 0.0, None, 0, False, None, 0.0, 0)


def assign(nodes: dict[str, NodeRecord], choices: dict[str, dict[str, Any]], n_stages: int) -> dict[str, int]:
    """Where each announced volunteer that has no record of its own yet goes. A volunteer whose choice is final
    counts at its stage; the others are placed in the order they announced (time, then peer id), each where it adds
    the most given the relays' records and the volunteers before it."""
    view = dict(nodes)
    pending = {p: c for p, c in choices.items() if p not in nodes and isinstance(c.get("stage"), int)}
    placed = {p: int(c["stage"]) for p, c in pending.items() if c.get("final")}
    view.update({p: _announced(p, k) for p, k in placed.items()})
    order = sorted((float(c.get("since") or 0.0), p) for p, c in pending.items() if p not in placed)
    for _, peer in order:
        placed[peer] = choose_stage(view, n_stages)
        view[peer] = _announced(peer, placed[peer])
    return placed


async def place_volunteer(
    membership: Membership,
    peer_id: str,
    n_stages: int,
    live_nodes: Callable[[], Awaitable[dict[str, NodeRecord]]],
    settle_s: float = SETTLE_S,
    ttl: float = CHOICE_TTL_S,
    gone: Callable[[set[str]], Awaitable[set[str]]] | None = None,
) -> int:
    """The stage a volunteer without --stage serves (see the module's docstring). `live_nodes()`: the records of
    the nodes that answer now. `gone(peers)`: those of `peers` certainly gone (a probe), whose announced choices
    no longer count: a volunteer killed after it chose lives on in its choice for CHOICE_TTL_S, and a stage it had
    chosen looked taken (a stage-loss run's two joiners both went to stage 1 while stage 3, whose two joiners had just
    been killed, had no replica; the data node gave up on it). A DHT write that fails is logged: the volunteer then
    places itself alone."""
    since = time.time()
    nodes = await live_nodes()
    first = assign(
        nodes, {**await _choices(membership, nodes, gone, peer_id), peer_id: {"since": since, "stage": 0}}, n_stages
    )
    await _announce(membership, {"stage": first[peer_id], "since": since}, ttl)
    await asyncio.sleep(settle_s)
    nodes = await live_nodes()
    choices = await _choices(membership, nodes, gone, peer_id)
    choices[peer_id] = {"stage": first[peer_id], "since": since}  # its own, whether or not the read saw it
    stage = assign(nodes, choices, n_stages)[peer_id]
    await _announce(membership, {"stage": stage, "since": since, "final": True}, ttl)
    if stage != first[peer_id]:
        log.info("volunteers arrived together: stage %d instead of %d", stage, first[peer_id])
    return stage


async def _choices(
    membership: Membership,
    nodes: dict[str, NodeRecord],
    gone: Callable[[set[str]], Awaitable[set[str]]] | None,
    me: str,
) -> dict[str, dict[str, Any]]:
    """The announced choices, less those of volunteers that `gone` finds gone (only the ones without a record of
    their own, which are the ones a choice counts for: see `assign`)."""
    try:
        choices = await asyncio.to_thread(membership.choices)
    except Exception as exc:  # noqa: BLE001 (a DHT read that timed out: place by the records alone)
        log.warning("reading the volunteers' choices failed (%s: %s)", type(exc).__name__, exc)
        return {}
    pending = {p for p in choices if p not in nodes and p != me}
    dead = await gone(pending) if gone is not None and pending else set()
    if dead:
        log.info("not counting the choices of %d volunteer(s) that do not answer: %s", len(dead), sorted(dead))
    return {p: c for p, c in choices.items() if p not in dead}


async def _announce(membership: Membership, choice: dict[str, Any], ttl: float) -> None:
    try:
        await asyncio.to_thread(membership.announce_choice, choice, ttl)
    except Exception as exc:  # noqa: BLE001 (a refused store must not stop a volunteer from joining)
        log.warning("announcing the stage chosen failed (%s: %s)", type(exc).__name__, exc)
