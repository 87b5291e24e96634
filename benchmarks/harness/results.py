"""What one run of a scenario returns (`RunResult`, the same for the gwtf swarm and the DeepSpeed baseline) and how
both read a data node's metrics file while it is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gwtf.launch.processes import read_jsonl


@dataclass
class RunResult:
    variant: dict[str, str]
    scenario: str
    rows: list[dict]  # data node 0's iteration lines, with `t` (wall seconds after t0) added
    other_rows: list[list[dict]]  # the other data nodes' iteration lines
    events: list[dict]  # what the harness did, with `t`
    t0: float  # unix time of the first iteration's start
    wall_s: float
    done: bool
    failed: list[str]
    leftover_pids: list[int]
    tokens_per_iteration: int
    log_dir: str
    redundancy: dict[str, float] | None = None  # recovery="redundant": the extra work the shadows cost (all relays)
    # the harness's own record of relays serving and killed: {"t", "node", "stage", "delta": +1 | -1}, in order
    timeline: list[dict] = field(default_factory=list)


def iterations(path: Path) -> list[dict]:
    """The iteration lines of a metrics file (JSON lines) so far."""
    return [r for r in read_jsonl(path) if r.get("event") == "iteration"]


def is_done(path: Path) -> bool:
    """Whether the metrics file has its `done` line (written after the last step)."""
    return any(r.get("event") == "done" for r in read_jsonl(path))
