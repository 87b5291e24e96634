"""One replica of a pipeline stage: forward, backward (also with recompute), gradient accumulation, optimizer.

A replica keeps, for each microbatch it holds, the input leaf and the output of its forward so that the backward
needs no recompute on the common path. Gradients are accumulated unscaled (each microbatch's own loss gradient)
with a count, so replicas of a stage average as sum(grads) / sum(counts): "weighted by microbatches processed".
At most `capacity` microbatches are held at once; the caller gets a refusal beyond that and routes elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gwtf.errors import BadMessage
from gwtf.optim import OptimConfig, lr_at, make_optimizer, set_lr

log = logging.getLogger(__name__)

Key = tuple[str, int, int]  # (origin data node, microbatch id, attempt)

# Parameters per state message: each travels with its two Adam moments, and a message carries at most
# MessageLimits.max_tensors (64) tensors; a large stage's state therefore moves in several messages.
STATE_CHUNK = 16


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """fn(*args) and the seconds it took, measured where it runs (in a node's compute thread)."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def state_subset(tensors: dict[str, torch.Tensor], meta: dict, names: list[str] | None) -> tuple[list, dict]:
    """The part of a replica's `state()` for parameter `names` (all when None): (tensors, meta with their keys)."""
    wanted = set(names) if names else {k.split("/", 1)[1] for k in tensors}
    keys = [k for k in tensors if k.split("/", 1)[1] in wanted]
    steps = {n: s for n, s in meta["steps"].items() if n in wanted}
    return [tensors[k] for k in keys], {**meta, "steps": steps, "keys": keys}


@dataclass
class Held:
    """What a replica keeps of one microbatch between its forward and its backward."""

    inp: torch.Tensor  # leaf with requires_grad: (batch, seq, d_model)
    out: torch.Tensor  # output with its autograd graph


@dataclass
class StageStats:
    forward: int = 0
    backward: int = 0
    recomputed: int = 0
    dropped: int = 0
    compute_s: float = 0.0


@dataclass
class StageReplica:
    """The compute state of one replica of stage `index` (1..S for relays; 0 is held by data nodes)."""

    index: int
    module: nn.Module
    optim_cfg: OptimConfig
    total_steps: int
    capacity: int = 4
    version: int = 0  # optimizer steps applied so far
    held: dict[Key, Held] = field(default_factory=dict)
    count: int = 0  # microbatches whose gradient is accumulated this iteration
    stats: StageStats = field(default_factory=StageStats)
    last_grad_norm: float | None = None
    lr_scale: float = 1.0  # raised after a CheckFree rebuild, decaying back (see `boost`)
    boost: Any = None  # the gwtf.recovery.RebuiltStage this replica was rebuilt from, for its lr schedule
    boost_from: int = 0  # the version it was rebuilt at

    def __post_init__(self) -> None:
        self.optimizer: torch.optim.Optimizer = make_optimizer(self.module, self.optim_cfg)
        self.lock = threading.Lock()  # forward/backward/step of one replica never interleave
        self.module.zero_grad(set_to_none=True)

    # ---- forward / backward -------------------------------------------------------------------------------------
    def forward(self, key: Key, hidden: torch.Tensor) -> torch.Tensor:
        """Run the stage on `hidden`, keep what the backward needs, return a detached output."""
        with self.lock:
            # A restarted microbatch supersedes its earlier attempts: they must not hold capacity.
            stale = [k for k in self.held if k[:2] == key[:2] and k[2] < key[2]]
            for k in stale:
                del self.held[k]
            self.stats.dropped += len(stale)
            if key not in self.held and len(self.held) >= self.capacity:
                raise BadMessage(f"stage {self.index} replica is full ({self.capacity} microbatches held)")
            inp = hidden.detach().requires_grad_(True)
            out = self.module(inp)
            self.held[key] = Held(inp, out)
            self.stats.forward += 1
            return out.detach()

    def held_keys(self) -> list[Key]:
        """A snapshot of the held microbatches' keys, safe on the event loop while the compute thread adds or drops
        some (list() copies a dict in one step under the GIL; a comprehension over the dict itself can be interrupted
        and fail with "dictionary changed size during iteration")."""
        return list(self.held)

    def backward(self, key: Key, grad_out: torch.Tensor) -> torch.Tensor:
        """Backward of a held microbatch; accumulates parameter gradients and returns d loss / d input."""
        with self.lock:
            held = self.held.pop(key, None)
            if held is None:
                raise BadMessage(f"stage {self.index} holds no microbatch {key}")
            return self._backward(held, grad_out)

    def recompute_backward(self, key: Key, hidden: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """Forward + backward for a microbatch whose original replica died after its forward."""
        with self.lock:
            self.held.pop(key, None)
            inp = hidden.detach().requires_grad_(True)
            held = Held(inp, self.module(inp))
            self.stats.recomputed += 1
            return self._backward(held, grad_out)

    def _backward(self, held: Held, grad_out: torch.Tensor) -> torch.Tensor:
        if grad_out.shape != held.out.shape:
            raise BadMessage(f"gradient shape {tuple(grad_out.shape)} != output shape {tuple(held.out.shape)}")
        held.out.backward(grad_out)
        self.count += 1
        self.stats.backward += 1
        assert held.inp.grad is not None
        return held.inp.grad.detach()

    def drop(self, keys: list[Key] | None = None) -> int:
        """Forget held microbatches (all of them at an iteration's end: they belong to lost or restarted work)."""
        with self.lock:
            doomed = list(self.held) if keys is None else [k for k in keys if k in self.held]
            for k in doomed:
                del self.held[k]
            self.stats.dropped += len(doomed)
            return len(doomed)

    # ---- gradients and the optimizer ---------------------------------------------------------------------------
    def grad_tensors(self) -> list[torch.Tensor]:
        """The accumulated (unscaled) gradient of every parameter, zeros where none flowed."""
        return [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.module.parameters()]

    def apply_averaged(self, grads: list[torch.Tensor], iteration: int) -> None:
        """Set the averaged gradients and step the optimizer; the replica's version becomes iteration + 1."""
        with self.lock:
            params = list(self.module.parameters())
            if len(grads) != len(params):
                raise BadMessage(f"averaged gradients for {len(grads)} parameters, stage has {len(params)}")
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype).clone()
            self.last_grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            if self.boost is not None:
                self.lr_scale = self.boost.lr_scale_at(iteration - self.boost_from)
            set_lr(self.optimizer, lr_at(iteration, self.total_steps, self.optim_cfg) * self.lr_scale)
            self.optimizer.step()
            self.module.zero_grad(set_to_none=True)
            self.count = 0
            self.version = iteration + 1
        self.drop()

    def skip_step(self, iteration: int) -> None:
        """Take version `iteration` without an optimizer step: the stage's update of iteration - 1 is lost."""
        with self.lock:
            if self.version == iteration:
                return  # advanced already (several data nodes, or one asking twice)
            if self.version != iteration - 1:
                raise BadMessage(f"skip to v{iteration} from v{self.version}: only one step can be skipped")
            self.module.zero_grad(set_to_none=True)
            self.count = 0
            self.version = iteration
        self.drop()

    # ---- state transfer ----------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Parameters and optimizer state by stable name (for a joiner or a neighbour)."""
        with self.lock:
            tensors = {f"param/{n}": p.detach().clone() for n, p in self.module.named_parameters()}
            names = {id(p): n for n, p in self.module.named_parameters()}
            steps = {}
            for p, st in self.optimizer.state.items():
                n = names[id(p)]
                tensors[f"exp_avg/{n}"] = st["exp_avg"].clone()
                tensors[f"exp_avg_sq/{n}"] = st["exp_avg_sq"].clone()
                steps[n] = float(st["step"])
            meta = {
                "version": self.version,
                "steps": steps,
                "lr_scale": self.lr_scale,
                "grad_norm": self.last_grad_norm,
            }
            return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        with self.lock:
            params = dict(self.module.named_parameters())
            missing = [n for n in params if f"param/{n}" not in tensors]
            if missing:
                raise BadMessage(f"state for stage {self.index} lacks {len(missing)} parameters, e.g. {missing[0]}")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(tensors[f"param/{n}"])
            self.optimizer = make_optimizer(self.module, self.optim_cfg)
            for n, step in meta.get("steps", {}).items():
                p = params[n]
                self.optimizer.state[p] = {
                    "step": torch.tensor(step),
                    "exp_avg": tensors[f"exp_avg/{n}"].clone(),
                    "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].clone(),
                }
            self.version = int(meta["version"])
            self.lr_scale = float(meta.get("lr_scale", 1.0))
            self.module.zero_grad(set_to_none=True)
            self.count = 0
