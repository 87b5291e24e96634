"""What every node of a run agrees on (`RunSpec`, from the run record) and what each node chooses for itself
(`NodeOptions`, from its join flags)."""

from __future__ import annotations

from dataclasses import dataclass

from gwtf.config import RunConfig
from gwtf.device import check_device
from gwtf.errors import UserError
from gwtf.models.presets import ModelConfig
from gwtf.optim import OptimConfig
from gwtf.routing.cost import load_regions


@dataclass
class RunSpec:
    """The run: its id, its config (the run record's), the model built from it, and the data nodes it expects."""

    run_id: str
    config: RunConfig
    model: ModelConfig
    data_nodes: int = 1  # data nodes the run expects; fewer only when some have died

    @property
    def optim(self) -> OptimConfig:
        return self.config.optim

    @property
    def total_steps(self) -> int:
        return self.config.train.steps

    @property
    def seed(self) -> int:
        return self.config.train.seed

    @property
    def pretrained(self) -> str | None:
        """Staged checkpoint the first replicas load (fine-tuning); later ones download."""
        return self.config.pretrained

    @property
    def microbatch_size(self) -> int:
        """Sequences per microbatch (the routers' activation size)."""
        return self.config.train.microbatch_size


def run_spec(run_id: str, cfg: RunConfig, data_nodes: int = 1) -> RunSpec:
    if data_nodes < 1:
        raise UserError(f"data nodes: a run needs at least 1, got {data_nodes}")
    return RunSpec(run_id, cfg, cfg.model_config(), data_nodes)


@dataclass
class NodeOptions:
    """A node's own settings (`gwtf join --capacity --region --device`), not the run's."""

    capacity: int | None = 4  # microbatches a relay holds at once; None: derived from its device's memory (gwtf.sizing)
    region: str | None = None  # emulate this region's links (gwtf/resources/regions.json)
    device: str = "cpu"  # auto | cpu | cuda | cuda:N (gwtf.device); resolved when the node starts, after its DHT

    def __post_init__(self) -> None:
        self.device = check_device(self.device)
        if self.capacity is not None and self.capacity < 1:
            raise UserError(f"capacity={self.capacity}: a relay holds at least 1 microbatch")
        known = load_regions().regions
        if self.region is not None and self.region not in known:
            raise UserError(f"region {self.region!r} is not in the region table; choose one of {', '.join(known)}")
