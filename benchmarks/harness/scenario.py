"""A churn scenario (`benchmarks/scenarios/*.toml`): the swarm's relays, its churn and its trace, checked on load."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gwtf.errors import UserError


@dataclass
class NodeSpec:
    """A relay slot: `count` relays of `stage` (None: the joiner picks) in `region`, `speed` x base compute."""

    stage: int | None = None
    region: str | None = None
    speed: float = 1.0
    capacity: int = 4
    count: int = 1

    def __post_init__(self) -> None:
        if self.speed <= 0 or self.capacity < 1 or self.count < 1:
            raise UserError(f"node {self}: speed must be > 0, capacity and count >= 1")


@dataclass
class TraceEvent:
    """`crash` a named relay (`node`) or one of `stage`, or `join` `count` relays, at modelled second `at_s`."""

    at_s: float
    action: str
    node: str | None = None
    stage: int | None = None
    region: str | None = None
    speed: float = 1.0
    capacity: int = 4
    count: int = 1

    def __post_init__(self) -> None:
        if self.action not in ("crash", "join", "stage_loss") or self.at_s < 0:
            raise UserError(f"trace event {self}: action must be crash, join or stage_loss, at_s >= 0")


@dataclass
class Churn:
    """Failure rates per relay (`kind = "node"`) or per stage (`"stage"`: every replica at once) per modelled hour."""

    rate_per_hour: float = 0.0
    kind: str = "node"
    rejoin_after_s: float | None = 300.0  # modelled seconds until a replacement joins (None: never)
    min_per_stage: int = 1  # a node crash never takes a stage below this many serving replicas

    def __post_init__(self) -> None:
        if self.kind not in ("node", "stage") or not 0 <= self.rate_per_hour < 100:
            raise UserError(f"churn {self}: kind is node or stage, rate_per_hour a fraction (0.1 = 10 %/h)")


@dataclass
class Scenario:
    name: str
    preset: str = "debug"
    stages: int = 3
    steps: int = 40
    target_loss: float | None = None
    seed: int = 0
    time_scale: float = 1.0  # modelled seconds per wall second
    router: str = "gwtf"
    recovery: str = "checkfree"
    compute_ms: float = 0.0  # emulated compute per microbatch forward at speed 1
    data_nodes: int = 1
    data_region: str | None = None
    timeout_s: float = 600.0  # one run's wall-clock limit
    overrides: list[str] = field(default_factory=list)  # run config `section.key=value` (every run setting)
    nodes: list[NodeSpec] = field(default_factory=list)
    churn: Churn = field(default_factory=Churn)
    trace: list[TraceEvent] = field(default_factory=list)
    checkpoint_every: int = 10  # the DeepSpeed baseline's checkpoint interval, in steps

    def __post_init__(self) -> None:
        if (
            self.time_scale <= 0
            or self.steps < 1
            or self.data_nodes < 1
            or self.compute_ms < 0
            or self.checkpoint_every < 1
        ):
            raise UserError(
                f"scenario {self.name}: time_scale, steps, data_nodes, checkpoint_every positive; compute_ms >= 0"
            )
        missing = sorted(set(range(1, self.stages + 1)) - {n.stage for n in self.nodes})
        if missing:
            raise UserError(f"scenario {self.name}: stages {missing} have no relay in [[nodes]]")

    def wall(self, modelled_s: float) -> float:
        return modelled_s / self.time_scale

    @property
    def relays(self) -> int:
        return sum(n.count for n in self.nodes)


def load_scenario(path: str | Path) -> Scenario:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise UserError(f"scenario {path} not found; see benchmarks/scenarios/") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"scenario {path} is not valid TOML: {exc}") from exc
    raw.setdefault("name", Path(path).stem)
    try:
        return Scenario(
            **{k: v for k, v in raw.items() if k not in ("nodes", "churn", "trace")},
            nodes=[NodeSpec(**n) for n in raw.get("nodes", [])],
            churn=Churn(**raw.get("churn", {})),
            trace=[TraceEvent(**t) for t in raw.get("trace", [])],
        )
    except TypeError as exc:
        raise UserError(f"scenario {path}: {exc}") from exc
