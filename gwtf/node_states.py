"""Why a node is or is not routed through, in words, from the run's node records (and the data nodes' telemetry).

`gwtf status` prints these next to every replica:

    serving                                    up to date, with room: routers may pick it
    joining: downloading state                 announced, still loading its stage; not routed through yet
    leaving: takes no new microbatches         stopping
    stale: at version 7, the run is at 9       behind the run: it catches up (downloads) before it is routed again
    full: holds 4 of 4 microbatches            it can take no more this iteration
    full: all 4 slots promised (holds 1 now)   gwtf-p2p: its routing agent has promised every slot (room 0)
    unreachable: a data node found it gone     its record has not expired yet, but a data node's probe found it gone
    rebuilt from mean(1,3)                     added to the above: how its stage was rebuilt when every replica died

The run's version (its step) is the highest state version among serving data nodes (their records, or the fresher
one their telemetry carries). Records are written once a heartbeat, several steps apart in a fast run, so a replica
counts as stale only when even the version a data node confirmed first hand (telemetry `versions`, from the
replica's `stepped` replies) is more than LAG_TOLERATED behind. Everything here is a pure function of the records
and the telemetry, so tests and the status command call it alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gwtf.membership import NodeRecord, serving

# a data node's telemetry (gwtf.telemetry): the peers its probes found gone, the relays' versions it knows first
# hand, and its own version
GONE_FIELD, VERSIONS_FIELD, VERSION_FIELD = "gone", "versions", "version"
LAG_TOLERATED = 1  # steps a replica may seem behind the run before it is called stale (see above)


def run_version(nodes: Mapping[str, NodeRecord], telemetry: Mapping[str, Any] | None = None) -> int | None:
    """The run's version: the highest state version among serving data nodes (None while there is none)."""
    data = serving(dict(nodes), "data")
    published = [_field(telemetry, p, VERSION_FIELD) for p in data]
    versions = [r.state_version for r in data.values()] + [v for v in published if type(v) is int]
    return max(versions) if versions else None


def confirmed_versions(telemetry: Mapping[str, Any] | None) -> dict[str, int]:
    """Node -> the newest version a data node knows it at first hand: the relays' from their `stepped` replies, the
    data node's own (its records lag too)."""
    found: dict[str, int] = {}
    for reporter in telemetry or {}:
        versions = _field(telemetry, reporter, VERSIONS_FIELD)
        own = [(reporter, _field(telemetry, reporter, VERSION_FIELD))]
        for peer, version in [*(versions.items() if isinstance(versions, Mapping) else ()), *own]:
            if isinstance(peer, str) and type(version) is int:
                found[peer] = max(version, found.get(peer, version))
    return found


def _field(telemetry: Mapping[str, Any] | None, reporter: str, name: str) -> Any:
    fields = (telemetry or {}).get(reporter)
    return fields.get(name) if isinstance(fields, Mapping) else None


def found_gone(telemetry: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """Peer -> the data nodes whose telemetry lists it as gone. Telemetry a data node has not published, or that
    lacks the field, adds nothing."""
    found: dict[str, list[str]] = {}
    for reporter in telemetry or {}:
        gone = _field(telemetry, reporter, GONE_FIELD)
        for peer in gone if isinstance(gone, list | tuple) else ():
            if isinstance(peer, str):
                found.setdefault(peer, []).append(reporter)
    return found


def explain(
    rec: NodeRecord, version: int | None, found_by: list[str] | tuple[str, ...] = (), confirmed: int | None = None
) -> str:
    """One node's state in words: every reason it is not routed through ("; "-joined), or "serving". `version`: the
    run's; `found_by`: the data nodes that found it gone; `confirmed`: the version a data node saw it step to."""
    if found_by:  # the root cause: what its record says no longer matters
        who = "a data node" if len(found_by) == 1 else f"{len(found_by)} data nodes"
        return f"unreachable: {who} found it gone"
    reasons = []
    if rec.status == "joining":
        reasons.append("joining: downloading state")
    elif rec.status == "leaving":
        reasons.append("leaving: takes no new microbatches")
    known = max(rec.state_version, confirmed if confirmed is not None else rec.state_version)
    if rec.status != "joining" and version is not None and known < version - LAG_TOLERATED:
        reasons.append(f"stale: at version {known}, the run is at {version}")
    if rec.role == "relay" and rec.status == "serving":
        reasons += _full(rec)
    if not reasons:
        reasons.append("serving")
    if rec.rebuilt_from:
        reasons.append(f"rebuilt from {rec.rebuilt_from}")
    return "; ".join(reasons)


def _full(rec: NodeRecord) -> list[str]:
    if rec.held >= rec.capacity:
        return [f"full: holds {rec.held} of {rec.capacity} microbatches"]
    if rec.room == 0:  # gwtf-p2p: its routing agent has promised every slot to data nodes
        return [f"full: all {rec.capacity} slots promised (holds {rec.held} now)"]
    return []


def explain_all(nodes: Mapping[str, NodeRecord], telemetry: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Every node's state in words, by peer id."""
    version, gone, confirmed = run_version(nodes, telemetry), found_gone(telemetry), confirmed_versions(telemetry)
    return {peer: explain(rec, version, gone.get(peer, []), confirmed.get(peer)) for peer, rec in nodes.items()}
