"""The dashboard's data: what it knows of a run across polls (`RunWatch`), and the JSON state the page draws.

Each poll hands `RunWatch.observe` the run's live node records (with the seconds each has left) and the data nodes'
telemetry (gwtf.telemetry); `RunWatch.state()` is the JSON the page and `GET /api/state` serve. Everything here is a
function of those inputs and the clock, so tests feed it an in-process swarm's records and telemetry directly.

A node is, in this order of precedence:
    dead         its record disappeared (ABSENT_POLLS reads in a row, without a goodbye), or a data node's probe
                 found it gone
    left         its record disappeared after it said it was leaving (or, for a data node, that it had finished)
    joining      it announced itself and is still loading its stage
    leaving      it takes no new microbatches
    stale        its record missed two heartbeats: it may have crashed (the record lives on until its TTL)
    catching-up  a relay behind the run's version: it downloads the stage before it is routed through again
    serving      up to date
The run's version is the newest a data node's telemetry states (else its record); a relay shows the newest of its
record's version and the one a data node confirmed (records are written once a heartbeat and lag behind a fast run).
The gap is computed on the view the data nodes routed over at the end of their last iteration: the records, each
relay at the version the telemetry confirmed then (`RunWatch.view`), against the plans the data nodes published.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gwtf.membership import NodeRecord, RunRecord
from gwtf.node_states import confirmed_versions
from gwtf.routing.base import SwarmView
from gwtf.runtime.spec import RunSpec
from gwtf.runtime.views import view_builder
from gwtf.telemetry import plan_paths, routing_gap

HISTORY_KEPT = 5000  # iterations the dashboard keeps per data node (and serves)
EVENTS_KEPT = 500
DEAD_SHOWN = 64  # dead or departed nodes still drawn in the pipeline, newest first
ENDED_KEPT = 1000  # dead or departed nodes remembered (a long run with churn sees many)
ABSENT_POLLS = 3  # reads in a row without a node's record before it counts as gone
MISSED_BEATS = 2.5  # a record with less than ttl - MISSED_BEATS heartbeats left has missed at least two beats

Records = Mapping[str, tuple[NodeRecord, float]]  # peer -> (record, seconds it has left)


@dataclass
class Seen:
    """A node as the dashboard saw it last."""

    record: NodeRecord
    left_s: float
    first_seen: float
    last_seen: float
    absent: int = 0  # reads in a row that did not find its record
    ended: str = ""  # "dead" | "left" once its record is gone or a probe found it gone
    ended_at: float = 0.0
    why_ended: str = ""


@dataclass
class RunWatch:
    """The run as the dashboard watches it: nodes seen, their ends, the merged history and the events."""

    run: RunRecord
    spec: RunSpec
    clock: Callable[[], float] = time.time
    nodes: dict[str, Seen] = field(default_factory=dict)
    telemetry: dict[str, dict[str, Any]] = field(default_factory=dict)  # the latest, per data node
    history: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # data node -> iteration -> row
    events: list[dict[str, Any]] = field(default_factory=list)
    _event_keys: dict[tuple, float] = field(default_factory=dict)  # what is already an event, and when
    _gap_cache: tuple[str, dict[str, Any]] | None = None
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.clock()
        self.build_view = view_builder(self.spec, self.spec.microbatch_size)

    # ---- what a poll brings ---------------------------------------------------------------------------------------
    def observe(self, records: Records, telemetry: Mapping[str, dict[str, Any]]) -> None:
        now = self.clock()
        for peer, data in telemetry.items():
            if isinstance(data, dict):
                self.telemetry[peer] = data
                self._merge_history(peer, data.get("history"))
                self._merge_events(peer, data.get("events"))
        for peer, (rec, left) in records.items():
            self._saw(peer, rec, left, now)
        for peer, seen in self.nodes.items():
            if not seen.ended and peer not in records:
                seen.absent += 1  # one read may miss a record (a loaded DHT): gone only once it stays gone
                if seen.absent >= ABSENT_POLLS:
                    finished = bool(self.telemetry.get(peer, {}).get("finished"))
                    left_cleanly = seen.record.status == "leaving" or finished
                    self._end(peer, "left" if left_cleanly else "dead", now, "its record expired")
        for peer, (when, reporter) in reported_gone(self.telemetry).items():
            if peer in self.nodes and not self.nodes[peer].ended:
                self._end(peer, "dead", min(when, now), f"data node {short(reporter)}'s probe found it gone")
        self._forget_ended()

    def _saw(self, peer: str, rec: NodeRecord, left: float, now: float) -> None:
        seen = self.nodes.get(peer)
        if seen is None:
            self.nodes[peer] = Seen(rec, left, now, now)
            where = f"stage {rec.stage}" if rec.role == "relay" else "as a data node"
            self._event(("join", peer), now, "join", f"{short(peer)} joined {where}", peer=peer, stage=rec.stage)
        else:
            seen.record, seen.left_s, seen.last_seen, seen.absent = rec, left, now, 0
        if rec.rebuilt_from:
            text = f"stage {rec.stage} rebuilt by {self.strategy} from {rec.rebuilt_from} ({short(peer)})"
            self._event(("rebuild", peer, rec.rebuilt_from), now, "rebuild", text, peer=peer, stage=rec.stage)

    def _end(self, peer: str, how: str, when: float, why: str) -> None:
        seen = self.nodes[peer]
        seen.ended, seen.ended_at, seen.why_ended = how, when, why
        rec = seen.record
        where = f" (stage {rec.stage})" if rec.role == "relay" else " (data node)"
        kind = "crash" if how == "dead" else "leave"
        self._event((kind, peer), when, kind, f"{short(peer)}{where} {how}: {why}", peer=peer, stage=rec.stage)

    def _event(self, key: tuple, when: float, kind: str, text: str, **fields: Any) -> None:
        if key in self._event_keys:
            return
        self._event_keys[key] = when
        self.events.append({"time": when, "kind": kind, "text": text, **fields})
        self.events.sort(key=lambda e: e["time"])
        del self.events[:-EVENTS_KEPT]
        if len(self._event_keys) > 4 * EVENTS_KEPT:  # forget the keys of events older than those kept
            oldest = self.events[0]["time"]
            self._event_keys = {k: t for k, t in self._event_keys.items() if t >= oldest}

    def _forget_ended(self) -> None:
        ended = sorted((s.ended_at, p) for p, s in self.nodes.items() if s.ended)
        for _, peer in ended[:-ENDED_KEPT]:
            del self.nodes[peer]

    def _merge_history(self, peer: str, rows: Any) -> None:
        mine = self.history.setdefault(peer, {})
        for row in rows if isinstance(rows, list) else []:
            clean = clean_row(row)
            if clean is not None:
                mine[clean["iteration"]] = clean
        for old in sorted(mine)[:-HISTORY_KEPT]:
            del mine[old]

    def _merge_events(self, peer: str, events: Any) -> None:
        """The data node's re-routes, restarts and recoveries (its `gone` and `rebuild` events are the dashboard's
        own crash and rebuild events, drawn from the same facts)."""
        for e in events if isinstance(events, list) else []:
            ok = isinstance(e, dict) and e.get("kind") in ("reroute", "restart", "recovery")
            if ok and isinstance(e.get("time"), int | float) and isinstance(e.get("text"), str):
                key = (peer, e["time"], e["kind"], e["text"])
                self._event(key, float(e["time"]), e["kind"], e["text"], reporter=peer)

    @property
    def strategy(self) -> str:
        return self.spec.config.recovery.strategy

    # ---- the state the page draws ---------------------------------------------------------------------------------
    def run_version(self) -> int | None:
        """The newest version a data node holds, as its telemetry says (of the same moment as the relays' versions
        it confirms), else as its record says; None before any data node is seen."""
        told = [t["version"] for t in self.telemetry.values() if type(t.get("version")) is int]
        versions = told or [s.record.state_version for s in self.live().values() if s.record.role == "data"]
        return max(versions) if versions else None

    def live(self) -> dict[str, Seen]:
        return {p: s for p, s in self.nodes.items() if not s.ended}

    def told_versions(self) -> dict[str, int]:
        """The versions the data nodes' telemetry states: theirs, and those of the relays that replied to them, as
        of the end of their last iteration (the newest where two data nodes disagree)."""
        return confirmed_versions(self.telemetry)  # what `gwtf status` reads too

    def with_versions(self, versions: Mapping[str, int], newest: bool) -> dict[str, NodeRecord]:
        """The live records with `versions` in place of theirs (`newest`: only where those are newer)."""
        out = {}
        for p, s in self.live().items():
            version = versions.get(p, s.record.state_version)
            if newest:
                version = max(version, s.record.state_version)
            out[p] = NodeRecord.from_dict({**s.record.to_dict(), "state_version": version})
        return out

    def confirmed_records(self) -> dict[str, NodeRecord]:
        """The live records at the newest version known: a record's, or the one a data node's telemetry confirms
        (records are written once a heartbeat)."""
        return self.with_versions(self.told_versions(), newest=True)

    def view(self) -> SwarmView:
        """The swarm as the data nodes routed over it at the end of their last iteration: serving nodes at the run's
        version, each relay at the version a data node confirmed then (a record may be a step ahead of it by now;
        gwtf.runtime.views builds the view as a data node does)."""
        return self.build_view(self.with_versions(self.told_versions(), newest=False), self.run_version())

    def state(self) -> dict[str, Any]:
        now = self.clock()
        records, version = self.confirmed_records(), self.run_version()
        cfg = self.spec.config
        history = merged_history(self.history)
        flows = self.flows()
        return jsonable(
            {
                "run": {
                    "id": self.run.run_id,
                    "preset": cfg.preset,
                    "stages": self.spec.model.n_stages,
                    "router": cfg.routing.router,
                    "recovery": cfg.recovery.strategy,
                    "keyed": bool(self.run.key_id),
                    "data_nodes": self.spec.data_nodes,
                },
                "time": now,
                "watching_since": self.started,
                "version": version,
                "stages": self.pipeline(records, version, flows, now),
                "flows": flows,
                "gap": self.gap(),
                "history": history,
                "events": [{**e, "step": at_step(history, e["time"])} for e in self.events],
                "accounting": accounting(history),
                "wire": wire_totals(self.telemetry),
            }
        )

    def pipeline(
        self, records: dict[str, NodeRecord], version: int | None, flows: dict[str, Any], now: float
    ) -> list[dict[str, Any]]:
        """Stage 0 (the data nodes) and every relay stage, each with its nodes, live ones first."""
        routed: dict[str, int] = {}
        for _, dst, n, _ in flows["edges"]:
            routed[dst] = routed.get(dst, 0) + n
        ended = sorted((p for p, s in self.nodes.items() if s.ended), key=lambda p: -self.nodes[p].ended_at)
        shown = [*sorted(self.live()), *ended[:DEAD_SHOWN]]
        stages: list[dict[str, Any]] = [{"stage": k, "nodes": []} for k in range(self.spec.model.n_stages + 1)]
        for peer in shown:
            seen = self.nodes[peer]
            rec = records.get(peer, seen.record)
            box = self.box(peer, seen, rec, version, routed.get(peer, 0), now)
            stage = rec.stage if 0 <= rec.stage < len(stages) else None
            if stage is not None:
                stages[stage]["nodes"].append(box)
        return stages

    def box(
        self, peer: str, seen: Seen, rec: NodeRecord, version: int | None, routed: int, now: float
    ) -> dict[str, Any]:
        state, why = node_state(seen, rec, version, self.spec.config.membership)
        return {
            "peer": peer,
            "short": short(peer),
            "role": rec.role,
            "stage": rec.stage,
            "status": rec.status,
            "state": state,
            "why": why,
            "region": rec.region,
            "device": rec.device,
            "capacity": rec.capacity,
            "held": rec.held,
            "version": rec.state_version,
            "compute_ms": rec.compute_s * 1000.0,
            "room": rec.room,
            "rebuilt_from": rec.rebuilt_from,
            "done": rec.microbatches_done,
            "routed": routed,
            "age_s": now - seen.first_seen,
            "ended_at": seen.ended_at or None,
        }

    def flows(self) -> dict[str, Any]:
        """The latest iteration's links of every data node, merged: [src, dst, microbatches, cost]."""
        links: dict[tuple[str, str], list[Any]] = {}
        iterations = []
        for t in self.telemetry.values():
            rows = t.get("history") or []
            if rows and isinstance(rows[-1], dict):
                iterations.append(rows[-1].get("iteration"))
            for edge in t.get("flows") or []:
                if isinstance(edge, list) and len(edge) == 4:
                    src, dst, n, cost = edge
                    key = (str(src), str(dst))
                    if key in links:
                        links[key][2] += int(n)
                    else:
                        links[key] = [key[0], key[1], int(n), float(cost)]
        its = [i for i in iterations if isinstance(i, int)]
        return {"iteration": max(its) if its else None, "edges": sorted(links.values(), key=lambda e: (e[0], e[1]))}

    def gap(self) -> dict[str, Any]:
        """The routing's throughput and worst path against the optimum on the dashboard's view of the same records
        (gwtf.telemetry.routing_gap over the data nodes' published plans)."""
        view = self.view()
        plan: dict[str, list[list[str]]] = {}
        demands: dict[str, int] = {}
        iterations = []
        for peer, t in self.telemetry.items():
            planned = isinstance(t.get("plan_iteration"), int) and t["plan_iteration"] >= 0
            if peer in view.data_nodes and isinstance(t.get("demand"), int) and planned:
                plan[peer], demands[peer] = plan_paths(t.get("plan") or []), t["demand"]
                iterations.append(t["plan_iteration"])
        if not demands:
            return {"available": False, "why": "no serving data node has published a plan yet"}
        through = {r for paths in plan.values() for path in paths for r in path}
        missing = sorted(through - set(view.relays))
        if missing:
            names = ", ".join(map(short, missing))
            return {"available": False, "why": f"the last plan routes through relays no longer routable: {names}"}
        key = json.dumps([plan, demands, sorted((r.peer_id, r.capacity, r.compute_s) for r in view.relays.values())])
        if self._gap_cache is None or self._gap_cache[0] != key:
            self._gap_cache = (key, routing_gap(view, plan, demands))
        return {"available": True, "iteration": max(iterations), **self._gap_cache[1]}


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers


def short(peer: str) -> str:
    """A peer id short enough for a box: libp2p ids share their first characters, so their last ones."""
    return peer if len(peer) <= 12 else "…" + peer[-6:]


def node_state(seen: Seen, rec: NodeRecord, version: int | None, beat: Any) -> tuple[str, str]:
    """(state, why) of a node; `beat`: the run's MembershipConfig (heartbeat_s, record_ttl_s)."""
    if seen.ended:
        return seen.ended, seen.why_ended
    if rec.status in ("joining", "leaving"):
        return rec.status, "downloading its stage" if rec.status == "joining" else "takes no new microbatches"
    missed = beat.record_ttl_s - seen.left_s
    if missed > MISSED_BEATS * beat.heartbeat_s:
        return "stale", f"no heartbeat for {missed:.1f}s (record expires in {seen.left_s:.1f}s)"
    if rec.role == "relay" and version is not None and rec.state_version < version:
        return "catching-up", f"at version {rec.state_version}, the run is at {version}"
    return "serving", f"at version {rec.state_version}"


def reported_gone(telemetry: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[float, str]]:
    """Peer -> (when, by which data node) for every peer a data node's probe found gone (the earliest report)."""
    found: dict[str, tuple[float, str]] = {}
    for reporter, t in telemetry.items():
        times = {e.get("peer"): e.get("time") for e in t.get("events") or [] if isinstance(e, dict)}
        for peer in t.get("gone") or []:
            when = times.get(peer)
            when = float(when) if isinstance(when, int | float) else float(t.get("time", 0.0))
            if isinstance(peer, str) and (peer not in found or when < found[peer][0]):
                found[peer] = (when, reporter)
    return found


COUNTS = ("started", "finished", "rerouted", "partial", "lost")
FIGURES = ("time", "loss", "val_loss", "tokens_per_s", "seconds")


def clean_row(row: Any) -> dict[str, Any] | None:
    """A published history row with the types the page expects (a malformed one is dropped)."""
    if not isinstance(row, dict) or type(row.get("iteration")) is not int:
        return None
    out: dict[str, Any] = {"iteration": row["iteration"]}
    for k in FIGURES:
        v = row.get(k)
        out[k] = float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None
    for k in COUNTS:
        v = row.get(k)
        out[k] = v if type(v) is int and v >= 0 else 0
    return out if out["time"] is not None else None


def merged_history(per_node: Mapping[str, Mapping[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per iteration over every data node: microbatch counts and tokens/s summed, loss averaged over the
    data nodes' microbatches (their losses are means over their own)."""
    by_iteration: dict[int, list[dict[str, Any]]] = {}
    for node_rows in per_node.values():
        for i, row in node_rows.items():
            by_iteration.setdefault(i, []).append(row)
    merged = []
    for i in sorted(by_iteration)[-HISTORY_KEPT:]:
        rows = by_iteration[i]
        merged.append(
            {
                "iteration": i,
                "time": max(r["time"] for r in rows),
                "loss": _weighted(rows, "loss"),
                "val_loss": _weighted(rows, "val_loss"),
                "tokens_per_s": sum(r["tokens_per_s"] or 0.0 for r in rows),
                "seconds": max(r["seconds"] or 0.0 for r in rows),
                "data_nodes": len(rows),
                **{k: sum(r[k] for r in rows) for k in COUNTS},
            }
        )
    return merged


def _weighted(rows: list[dict[str, Any]], key: str) -> float | None:
    pairs = [(r[key], max(r["finished"] + r["partial"], 1)) for r in rows if r[key] is not None]
    if not pairs:
        return None
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def accounting(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Microbatches of the last iteration and of every iteration the dashboard has seen."""
    total = {k: sum(r[k] for r in history) for k in COUNTS}
    last = {k: history[-1][k] for k in COUNTS} if history else dict.fromkeys(COUNTS, 0)
    return {"iterations": len(history), "last": last, "total": total}


def wire_totals(telemetry: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Bytes on the wire per message kind, sent and received, summed over the data nodes' transports."""
    out: dict[str, dict[str, int]] = {"sent": {}, "received": {}}
    for t in telemetry.values():
        wire = t.get("wire") or {}
        for direction in out:
            for kind, n in (wire.get(direction) or {}).items():
                if isinstance(n, int):
                    out[direction][str(kind)] = out[direction].get(str(kind), 0) + n
    return out


def at_step(history: list[dict[str, Any]], when: float) -> float | None:
    """Where wall time `when` falls on the steps axis: iteration i ran between the end of i-1 and its own end, so
    an event during it lands between i-1 and i (after the last one: on the iteration in progress)."""
    if not history:
        return None
    prev_i, prev_t = history[0]["iteration"] - 1, history[0]["time"] - history[0].get("seconds", 0.0)
    for row in history:
        if when <= row["time"]:
            span = max(row["time"] - prev_t, 1e-9)
            return prev_i + min(max((when - prev_t) / span, 0.0), 1.0) * (row["iteration"] - prev_i)
        prev_i, prev_t = row["iteration"], row["time"]
    return history[-1]["iteration"] + 1.0


def jsonable(value: Any) -> Any:
    """NaN and infinities as null (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
