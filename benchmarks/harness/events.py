"""The event schedule: crashes, stage losses and joins in wall seconds, drawn once per scenario from its seed (the
same for every compared run); rejoins are added by a run when its crashes happen."""

from __future__ import annotations

import random
from dataclasses import dataclass

from gwtf.benchmarks.harness.scenario import NodeSpec, Scenario


@dataclass
class Event:
    t: float  # wall seconds after the first iteration
    action: str  # crash | join | stage_loss
    origin: str  # rate | trace | rejoin
    index: int = 0
    node: str | None = None
    stage: int | None = None
    slot: NodeSpec | None = None


def draw_events(sc: Scenario, horizon_s: float) -> list[Event]:
    """Rate crashes (Poisson, seeded) and the trace, in wall seconds up to `horizon_s`; rejoins come at run time."""
    rng = random.Random(sc.seed)
    per_s = sc.churn.rate_per_hour / 3600 * sc.time_scale
    per_s *= sc.relays if sc.churn.kind == "node" else sc.stages
    events, t = [], 0.0
    action = "crash" if sc.churn.kind == "node" else "stage_loss"
    while per_s > 0:
        t += rng.expovariate(per_s)
        if t > horizon_s:
            break
        events.append(Event(t, action, "rate"))
    for ev in sc.trace:
        slot = NodeSpec(ev.stage, ev.region, ev.speed, ev.capacity, ev.count)
        events.append(Event(sc.wall(ev.at_s), ev.action, "trace", node=ev.node, stage=ev.stage, slot=slot))
    events.sort(key=lambda e: e.t)
    for i, ev in enumerate(events):
        ev.index = i
    return events


def victim_draw(sc: Scenario, ev: Event) -> random.Random:
    """The draw that picks a crash's victim (or a stage loss's stage) for event `ev`: seeded by its index, so the
    gwtf runs and the DeepSpeed baseline pick the same victims while their live sets are the same."""
    return random.Random(sc.seed * 7919 + ev.index)
