"""The optimizer and learning-rate schedule, shared by the local trainer and every swarm node.

There is one AdamW per stage module. AdamW updates each parameter from its own gradient and state only, so
stepping the stages separately is the same as one optimizer over the whole model; that is what lets a swarm
step each stage on the nodes that host it.

No global gradient clipping: clipping by the global norm would need the norm over all stages, i.e. one more
round of messages across the whole pipeline per step. The small presets train stably without it (warmup and
AdamW's normalisation do the work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gwtf.errors import UserError

SCHEDULES = ("cosine", "constant")


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.01  # on matrices (>= 2-D) only, never on norms and biases
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    schedule: str = "cosine"  # "cosine" | "constant" (after warmup)

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))  # TOML and JSON give lists
        if self.lr <= 0:
            raise UserError(f"optim.lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise UserError("optim.warmup_steps and optim.weight_decay must be >= 0 and optim.eps > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"optim.betas must be in [0, 1), got {self.betas}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups in parameter-registration order: matrices (decayed), then vectors and scalars (not decayed)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(module: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # foreach=False: the plain per-tensor loop, so a stage steps bit for bit the same on every node and in the
    # reference trainer whatever the device or tensor count (the multi-tensor path may round differently).
    return torch.optim.AdamW(
        param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for 0-based `step` of `total_steps`: linear warmup, then cosine decay or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + (cfg.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
