"""One replica of a pipeline stage: forward, backward (also with recompute), gradient accumulation, optimizer.

A replica keeps, for each microbatch it holds, the input leaf and the output of its forward so that the backward
needs no recompute on the common path. Gradients are accumulated unscaled (each microbatch's own loss gradient)
with a count, so replicas of a stage average as sum(grads) / sum(counts): "weighted by microbatches processed".
At most `capacity` microbatches are held at once; the caller gets a refusal beyond that and routes elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gwtf.device import autocast, module_device, to_device, to_host, wire_dtype
from gwtf.errors import BadMessage
from gwtf.optim import OptimConfig, lr_at, make_optimizer, set_lr

log = logging.getLogger(__name__)

Key = tuple[str, int, int]  # (origin data node, microbatch id, attempt)
_RNG_LOCK = threading.Lock()  # a seeded forward holds the process's RNG (in-process swarms run many nodes)

# A state message: each parameter travels with its two Adam moments (3 tensors, 3x its fp32 bytes); a message
# carries at most MessageLimits.max_tensors (64) tensors, so at most 21 parameters, and at most STATE_CHUNK_BYTES,
# so that no one message takes minutes on a slow link (a large stage moves in many, spread over the donors).
STATE_CHUNK_BYTES = 64 << 20
STATE_CHUNK_PARAMS = 21


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """fn(*args) and the seconds it took, measured where it runs (in a node's compute thread); CUDA, once in use, is
    synchronized before and after (its kernels run asynchronously: the clock would time their launches only)."""
    cuda = torch.cuda.is_initialized()  # no CUDA call on a node that never used it
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def state_bytes(module: nn.Module) -> dict[str, int]:
    """Each parameter's state bytes by name: the parameter and its two Adam moments, fp32."""
    return {n: 3 * 4 * p.numel() for n, p in module.named_parameters()}


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
    precision: str = "fp32"  # the run's train.precision: bf16 autocasts the forward; weights stay fp32
    checkpointing: bool = False  # train.activation_checkpointing: keep only the stage's input, recompute in backward
    dropout_seed: int | None = None  # with dropout: every forward's masks drawn from (seed, microbatch, stage, ...)

    def __post_init__(self) -> None:
        self.optimizer: torch.optim.Optimizer = make_optimizer(self.module, self.optim_cfg)
        self.lock = threading.Lock()  # forward/backward/step of one replica never interleave
        self.module.zero_grad(set_to_none=True)
        self._digest: tuple[int, str] | None = None  # (version, weights hash), until the weights change
        self.wire = wire_dtype(self.precision)  # activations and their gradients on the wire

    @property
    def device(self) -> torch.device:
        return module_device(self.module)

    def _input(self, hidden: torch.Tensor) -> torch.Tensor:
        """A received activation as this stage's fp32 input leaf, on its device."""
        return to_device(hidden.detach(), self.device).to(torch.float32).requires_grad_(True)

    def _run(self, key: Key, inp: torch.Tensor) -> torch.Tensor:
        with self._masks(key), autocast(self.device, self.precision):
            if self.checkpointing:  # the RNG state is saved with the input, so dropout is the same when recomputed
                return checkpoint(self.module, inp, use_reentrant=False)
            return self.module(inp)

    @contextlib.contextmanager
    def _masks(self, key: Key) -> Iterator[None]:
        """Dropout masks that depend on the microbatch alone (origin, id, attempt), this stage and its version: a
        replica that recomputes a microbatch whose replica died after its forward draws the original masks, so its
        backward is the gradient of the forward the next stage used. The process's RNG is held meanwhile (nodes of
        one process share it)."""
        if self.dropout_seed is None:
            yield
            return
        text = f"{self.dropout_seed}:{key[0]}:{key[1]}:{key[2]}:{self.index}:{self.version}"
        seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
        dev = self.device
        cuda = [dev.index or 0] if dev.type == "cuda" else []
        with _RNG_LOCK, torch.random.fork_rng(devices=cuda, device_type="cuda"):
            torch.random.default_generator.manual_seed(seed)
            if dev.type == "cuda":
                torch.cuda.default_generators[dev.index or 0].manual_seed(seed)
            yield

    def weights_digest(self) -> str:
        """A hash of every parameter's name and bytes (on CPU, whatever the device), cached for this version: the
        replicas of a stage compare theirs after each step (gwtf.runtime.consistency)."""
        with self.lock:
            if self._digest is None or self._digest[0] != self.version:
                h = hashlib.blake2b(digest_size=16)
                for name, p in self.module.named_parameters():
                    h.update(name.encode())
                    data: Any = p.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy()
                    h.update(data)  # the array's buffer, not a copy
                self._digest = (self.version, h.hexdigest())
            return self._digest[1]

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
            inp = self._input(hidden)
            out = self._run(key, inp)
            self.held[key] = Held(inp, out)
            self.stats.forward += 1
            return to_host(out, self.wire)

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
            inp = self._input(hidden)
            held = Held(inp, self._run(key, inp))
            self.stats.recomputed += 1
            return self._backward(held, grad_out)

    def _backward(self, held: Held, grad_out: torch.Tensor) -> torch.Tensor:
        if grad_out.shape != held.out.shape:
            raise BadMessage(f"gradient shape {tuple(grad_out.shape)} != output shape {tuple(held.out.shape)}")
        held.out.backward(to_device(grad_out, self.device).to(held.out.dtype))
        self.count += 1
        self.stats.backward += 1
        assert held.inp.grad is not None
        return to_host(held.inp.grad, self.wire)

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
        """The accumulated (unscaled) gradient of every parameter, zeros where none flowed, on the CPU (averaging
        works on fp32 CPU copies, so that replicas on any device agree)."""
        return [(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).cpu() for p in self.trainable()]

    def trainable(self) -> list[nn.Parameter]:
        """The parameters that train: all of them, or only LoRA's adapters (gwtf.lora; the base is frozen). Only these
        hold gradients and optimizer state, are averaged, and move on a state download."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def apply_averaged(self, grads: list[torch.Tensor], iteration: int) -> None:
        """Set the averaged gradients and step the optimizer; the replica's version becomes iteration + 1."""
        with self.lock:
            params = self.trainable()
            if len(grads) != len(params):
                raise BadMessage(f"averaged gradients for {len(grads)} parameters, stage has {len(params)}")
            for p, g in zip(params, grads):
                p.grad = g.to(device=p.device, dtype=p.dtype, copy=True)
            norms = [g.norm() for g in grads]  # none on a stage with nothing to train (stage 0 under LoRA)
            self.last_grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
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

    def skip_to(self, version: int) -> None:
        """Take `version` without the optimizer steps since this one's (their updates are lost): a data node's stage 0
        from a copy that lagged the relays (gwtf.runtime.stage0_copy)."""
        with self.lock:
            if version < self.version:
                raise BadMessage(f"skip to v{version} from v{self.version}: a stage does not go back")
            self.module.zero_grad(set_to_none=True)
            self.count = 0
            self.version = version
            self._digest = None
        self.drop()

    # ---- state transfer ----------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Parameters and optimizer state by stable name (for a joiner or a neighbour)."""
        with self.lock:
            # straight to CPU copies (a copy on the CPU device, a device-to-host copy from CUDA)
            tensors = {f"param/{n}": p.detach().to("cpu", copy=True) for n, p in self.module.named_parameters()}
            names = {id(p): n for n, p in self.module.named_parameters()}
            steps = {}
            for p, st in self.optimizer.state.items():
                n = names[id(p)]
                tensors[f"exp_avg/{n}"] = st["exp_avg"].to("cpu", copy=True)
                tensors[f"exp_avg_sq/{n}"] = st["exp_avg_sq"].to("cpu", copy=True)
                steps[n] = float(st["step"])
            meta = {
                "version": self.version,
                "steps": steps,
                "lr_scale": self.lr_scale,
                "grad_norm": self.last_grad_norm,
                # a rebuilt stage's decaying learning-rate boost: a replica that downloads this state must decay it
                # the same way, or the two step with different learning rates and diverge
                "boost": [self.boost.lr_scale, self.boost.lr_decay_steps, self.boost_from] if self.boost else None,
            }
            return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        with self.lock:
            params = dict(self.module.named_parameters())
            # Every trainable parameter; a frozen one (a LoRA base) only when it was sent (a joiner without the
            # staged copy downloads it once)
            missing = [n for n, p in params.items() if p.requires_grad and f"param/{n}" not in tensors]
            if missing:
                raise BadMessage(f"state for stage {self.index} lacks {len(missing)} parameters, e.g. {missing[0]}")
            with torch.no_grad():
                for n, p in params.items():
                    if f"param/{n}" in tensors:
                        p.copy_(tensors[f"param/{n}"])
            self.optimizer = make_optimizer(self.module, self.optim_cfg)
            for n, step in meta.get("steps", {}).items():
                p = params[n]
                self.optimizer.state[p] = {  # the moments on the parameter's device, as the optimizer keeps them
                    "step": torch.tensor(step),
                    "exp_avg": tensors[f"exp_avg/{n}"].to(device=p.device, dtype=p.dtype, copy=True),
                    "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].to(device=p.device, dtype=p.dtype, copy=True),
                }
            self.version = int(meta["version"])
            self._digest = None
            self.lr_scale = float(meta.get("lr_scale", 1.0))
            self.boost, self.boost_from = _boost(meta.get("boost"))
            self.module.zero_grad(set_to_none=True)
            self.count = 0


def _boost(sent: Any) -> tuple[Any, int]:
    """The learning-rate boost a donor's state carries (its scale, decay steps and start version), as the
    gwtf.recovery.RebuiltStage whose schedule `apply_averaged` reads; a state without one clears it."""
    if sent is None:
        return None, 0
    from gwtf.recovery.base import RebuiltStage

    try:
        scale, decay, start = float(sent[0]), int(sent[1]), int(sent[2])
    except (TypeError, ValueError, IndexError) as exc:
        raise BadMessage(f"a state's learning-rate boost must be [scale, decay steps, version], got {sent!r}") from exc
    return RebuiltStage({}, lr_scale=scale, lr_decay_steps=decay), start
