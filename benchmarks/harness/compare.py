"""`--compare`: the variants of a scenario (router x recovery x system) and running each on the same schedule.

With `--compare`, every variant runs the same scenario, seed, data and event times, one after the other; the
victims are the same as long as the live sets are.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from gwtf.benchmarks.harness.deepspeed_run import DeepSpeedRun
from gwtf.benchmarks.harness.events import draw_events
from gwtf.benchmarks.harness.results import RunResult
from gwtf.benchmarks.harness.scenario import Scenario
from gwtf.benchmarks.harness.settings import recovery_of
from gwtf.benchmarks.harness.swarm_run import SwarmRun
from gwtf.errors import UserError
from gwtf.recovery.config import RecoveryConfig
from gwtf.tensorboard import ScalarBoard

COMPARE_KEYS = ("router", "recovery", "system")
SYSTEMS = ("gwtf", "deepspeed")  # deepspeed: the static pipeline with checkpoint restart (harness.deepspeed_run)


def variants(compares: list[str]) -> list[dict[str, str]]:
    """`router=gwtf,swarm` x `recovery=checkfree,copy` -> every combination, in the given order. Router and
    recovery are gwtf's settings: a `system=deepspeed` variant drops them and appears once."""
    axes = []
    for spec in compares:
        key, sep, values = spec.partition("=")
        if not sep or key not in COMPARE_KEYS or not values:
            raise UserError(f"--compare {spec!r}: use KEY=V1,V2 with KEY one of {', '.join(COMPARE_KEYS)}")
        if key == "system" and set(values.split(",")) - set(SYSTEMS):
            raise UserError(f"--compare {spec!r}: systems are {', '.join(SYSTEMS)}")
        axes.append([(key, v) for v in values.split(",") if v])
    out: list[dict[str, str]] = []
    for combo in itertools.product(*axes) if axes else [()]:
        variant = dict(combo)
        if variant.get("system") == "deepspeed":
            variant = {"system": "deepspeed"}
        if variant not in out:
            out.append(variant)
    return out


def run_scenario(
    sc: Scenario,
    compares: list[str],
    log_root: Path,
    tensorboard: Path | None = None,
    dashboard: int | None = None,
    preload: bool = False,
) -> list[RunResult]:
    """Every variant in turn; with `tensorboard`, one TensorBoard run per variant in tensorboard/<scenario>/<label>;
    with `dashboard`, each gwtf variant's live dashboard on that port (gwtf.launch.dashboard); with `preload`, the
    gwtf variants' nodes are forked from a zygote (gwtf.launch.zygote; DeepSpeed's ranks stay plain processes, and
    its restarts' fixed costs are scaled in the report)."""
    for name in {recovery_of(sc, v) for v in variants(compares)}:
        RecoveryConfig(strategy=name)  # refused here, not as a node that exits in the middle of a run
    events = draw_events(sc, sc.timeout_s)
    results = []
    for variant in variants(compares):
        label = "-".join(variant.values()) or "base"
        log_dir = log_root / f"{sc.name}-{label}"
        log_dir.mkdir(parents=True, exist_ok=True)
        for stale in log_dir.glob("*"):
            if stale.is_file():
                stale.unlink()
        print(f"== {sc.name} [{label}]: {sc.relays} relays over {sc.stages} stages, {sc.data_nodes} data node(s), "
              f"{sc.steps} steps, {len(events)} planned events; logs in {log_dir}", flush=True)  # fmt: skip
        board = fresh_board_dir(tensorboard / sc.name / label) if tensorboard is not None else None
        if variant.get("system", "gwtf") == "deepspeed":
            results.append(DeepSpeedRun(sc, variant, log_dir, events).execute())
            if board is not None:  # its ranks write JSON lines only: their rows, as they happened
                with ScalarBoard(board) as scalars:
                    for row in results[-1].rows:
                        scalars.iteration(row, walltime=row["time"])
        else:  # its data nodes write the scalars as they go (with the routing's gap to the optimum)
            run = SwarmRun(sc, variant, log_dir, events, tensorboard=board, dashboard=dashboard, preload=preload)
            results.append(run.execute())
    return results


def fresh_board_dir(path: Path) -> Path:
    """A variant's TensorBoard folder without the event files of an earlier run of it (TensorBoard would show both
    as one run)."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.rglob("events.out.tfevents.*"):
        stale.unlink()
    return path
