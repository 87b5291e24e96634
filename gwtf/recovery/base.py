"""The recovery interface: what a strategy computes, and the hooks a live relay calls."""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gwtf.models.presets import ModelConfig

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
BuildModule = Callable[[int], nn.Module]
Handler = Callable[[Any], Awaitable[Any]]


@dataclass
class RebuiltStage:
    """What a strategy hands to the node that takes over a lost stage."""

    state_dict: StateDict
    lr_scale: float = 1.0  # the rebuilt stage's learning rate is the schedule's times this ...
    fresh_optimizer: bool = True
    lr_decay_steps: int = 0  # ... decaying linearly back to 1x over this many steps (0: it stays)
    optimizer_state: dict[str, Any] | None = None  # an exact takeover (redundant, checkpoint) keeps the moments
    source: str = ""  # how it was built, for logs and reports ("mean(2,4)", "copy(5)", "random", ...)
    transfer_stages: float = 0.0  # stage weight sets sent over the network to build it (modelled cost)

    def lr_scale_at(self, steps_since: int) -> float:
        """The learning-rate scale `steps_since` optimizer steps after the rebuild."""
        if self.lr_decay_steps <= 0:
            return self.lr_scale
        remaining = max(0.0, 1.0 - steps_since / self.lr_decay_steps)
        return 1.0 + (self.lr_scale - 1.0) * remaining


class RecoveryError(Exception):
    """A stage cannot be rebuilt by this strategy with what is still alive (e.g. every relay stage is lost)."""


class LiveRelay(Protocol):
    """What a strategy's live hooks use of the relay that runs them (gwtf.runtime.relay.RelayNode)."""

    peer_id: str
    stage: int
    status: str
    spec: Any  # gwtf.runtime.spec.RunSpec
    replica: Any  # gwtf.stage.StageReplica, once it holds its stage
    run_version: int
    closed: bool
    rebuilt_source: str
    incoming: set  # forwards acknowledged and waiting for its compute thread (recovery="redundant" yields to them)

    async def compute(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    async def call(self, peer: str, name: str, msg: Any, timeout: float | None = None) -> Any: ...

    def message(self, kind: str, **kw: Any) -> Any: ...

    async def live_nodes(self, max_age: float | None = None) -> dict[str, Any]: ...

    async def fetch_state_from(
        self, donors: list[str], names: list[str], handler: str = "get_state", **meta: Any
    ) -> tuple[dict[str, Tensor], dict]: ...

    async def neighbour_stages(
        self, build_module: BuildModule
    ) -> tuple[dict[int, nn.Module], dict[int, float], list[int]]: ...

    def spawn(self, coro: Any) -> None: ...

    def task_done(self, task: Any) -> None: ...


class RecoveryStrategy(ABC):
    """How a stage that lost all its replicas is rebuilt."""

    name: str = ""
    extra_forward_fraction: float = 0.0  # extra compute per iteration, as a fraction of one iteration's compute
    live: bool = True  # a live swarm can rebuild a stage with it (checkpoint: the one-process simulation only)

    def check(self, cfg: ModelConfig) -> None:
        """UserError if this strategy cannot apply to `cfg` (e.g. averaging unequal stages)."""
        return None

    def stage_order(self, n_stages: int, microbatch_index: int) -> list[int]:
        """The relay stage order for a microbatch: 1..S, except where a strategy trains out of order."""
        return list(range(1, n_stages + 1))

    def after_step(self, step: int, modules: Mapping[int, nn.Module], optimizers: Mapping[int, Any]) -> None:
        """Called after every optimizer step with `step` steps done, and once with 0 before training
        (checkpoint saves, redundant shadows)."""
        return None

    def rollback(self, modules: Mapping[int, nn.Module], optimizers: Mapping[int, Any]) -> int | None:
        """After the lost stages are installed: the step to resume from if every stage was rolled back
        (checkpoint), None where only the lost stages changed."""
        return None

    @abstractmethod
    def rebuild(
        self,
        lost: int,
        stages: Mapping[int, nn.Module],
        grad_norms: Mapping[int, float],
        cfg: ModelConfig,
        seed: int,
    ) -> RebuiltStage:
        """New state for relay stage `lost` from the live relay stages' modules `stages`."""

    # ---- hooks a live relay calls (gwtf.runtime); the defaults suit a strategy that rebuilds from neighbours ----
    def handlers(self, relay: LiveRelay) -> dict[str, Handler]:
        """Extra RPC handlers the relay serves for this strategy (name -> handler)."""
        return {}

    async def on_serving(self, relay: LiveRelay, build_module: BuildModule) -> None:
        """The relay holds its stage and is about to serve."""
        return None

    def on_forward(self, relay: LiveRelay, out: torch.Tensor) -> None:
        """The relay ran a forward (on its event loop, after the compute thread returned `out`)."""
        return None

    def on_step(self, relay: LiveRelay, version: int, grads: list[Tensor] | None = None) -> None:
        """The relay stepped its optimizer to `version`, with the averaged gradients `grads` where it applied them
        (None when its version moved otherwise). Never wait here: the step's path must stay short."""
        return None

    async def rebuild_live(self, relay: LiveRelay, build_module: BuildModule) -> tuple[RebuiltStage, int] | None:
        """The relay's stage lost every replica: its new state from the live neighbours (with `rebuild`) and the
        version it takes; None where the relay already holds the stage's exact state (an exact takeover)."""
        modules, norms, versions = await relay.neighbour_stages(build_module)
        model, seed = relay.spec.model, relay.spec.seed
        rebuilt = await relay.compute(self.rebuild, relay.stage, modules, norms, model, seed)
        return rebuilt, max(versions, default=relay.run_version)

    def close(self) -> None:
        """The relay is closing: cancel what the strategy runs in the background."""
        return None


# ---------------------------------------------------------------------------------------------------------------
# helpers


def state_copy(module: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def live_neighbours(lost: int, live: Mapping[int, nn.Module], n_stages: int) -> tuple[int | None, int | None]:
    """The nearest live relay stages before and after `lost` (None where there is none; stage 0 never counts)."""
    before = [k for k in live if 1 <= k < lost]
    after = [k for k in live if lost < k <= n_stages]
    return (max(before) if before else None), (min(after) if after else None)


def weighted_average(a_state: StateDict, b_state: StateDict, a: float, b: float) -> StateDict:
    """(a * A + b * B) / (a + b), parameter by parameter; equal weights (or both zero) give the plain mean."""
    if a_state.keys() != b_state.keys():
        raise RecoveryError("neighbour stages have different parameter names: they cannot be averaged")
    if not (a + b > 0):  # no gradient information (or NaN): fall back to the plain mean
        a = b = 1.0
    wa, wb = a / (a + b), b / (a + b)
    return {n: wa * a_state[n] + wb * b_state[n] for n in a_state}


def install(
    rebuilt: RebuiltStage,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
) -> torch.optim.Optimizer:
    """Load `rebuilt` into `module`; return the optimizer to use from now on (fresh, or with the kept state)."""
    module.load_state_dict(rebuilt.state_dict, strict=True)
    module.zero_grad(set_to_none=True)
    if rebuilt.fresh_optimizer or rebuilt.optimizer_state is None:
        return make_optimizer(module)
    fresh = make_optimizer(module)
    fresh.load_state_dict(copy.deepcopy(rebuilt.optimizer_state))
    return fresh
