"""Rebuilding a pipeline stage that lost every replica: CheckFree, CheckFree+ and the baselines, one interface.

Files:
    base.py        RecoveryStrategy (the one class a new strategy writes: `rebuild` for the one-process benchmark,
                   hooks a live relay calls), RebuiltStage, RecoveryError, LiveRelay, weighted_average, install
    checkfree.py   CheckFree and CheckFree+ (with its out-of-order pipelining: swap_order, swap_partner)
    baselines.py   copying a neighbour, a random re-initialisation
    checkpoint.py  periodic checkpoints and whole-model rollback (the one-process simulation only)
    redundant.py   redundant computation (Bamboo): shadows of the neighbouring stage, live and simulated
    registry.py    STRATEGIES by name, make_strategy
    config.py      RecoveryConfig: the run's strategy and how long data nodes wait for a lost stage
    failures.py    the failure model: per-stage hourly rates to per-iteration probabilities, FailureSchedule

A strategy gets the lost stage's index, the live relay stages' modules (at least its neighbours k-1 and k+1 where
they exist), their last gradient norms, the model config and a seed, and returns a `RebuiltStage`: the new
weights, whether the optimizer starts fresh, and a learning-rate scale for the rebuilt stage.

    strategy = make_strategy("checkfree")
    strategy.check(cfg)                                          # UserError where it cannot apply
    rebuilt = strategy.rebuild(3, {2: stage2, 4: stage4}, {2: 0.8, 4: 1.3}, cfg, seed=7)
    opt = install(rebuilt, stage3_module, opt, lambda m: make_optimizer(m, optim_cfg))

Strategies (section 7 of the design):
    checkfree    W_k = (a W_{k-1} + b W_{k+1}) / (a + b), a and b the neighbours' last gradient norms (the less
                 converged neighbour weighs more); fresh optimizer, lr x 1.2 decaying back to 1x. The first and
                 last relay stages have one relay neighbour: they copy it.
    checkfree+   trains with out-of-order pipelining (`swap_order`): on every odd microbatch stages 1,2 and
                 S-1,S run swapped, so a lost edge stage is rebuilt by copying its swap partner; middle stages as
                 checkfree.
    copy         copy the nearest live neighbour (fresh optimizer).
    random       a fresh initialisation with a new seed (fresh optimizer).
    checkpoint   a `CheckpointStore` keeps every stage (weights + optimizer) every K iterations; a loss rolls the
                 whole model back to the last complete checkpoint (`rollback`).
    redundant    Bamboo-style: the node before stage k also holds stage k and runs its forward redundantly, so it
                 takes over exactly (weights + optimizer); costs `extra_forward_fraction` more compute per iteration.
                 Live, the shadow follows its stage by applying the stage's averaged gradients of each step (a third
                 of the full state's bytes), checked by the stage's weights hash; a full download where that fails.

Choices measured with `python -m gwtf.benchmarks.recovery --steps 200 --failures-at 80,140 --failure-rate 0
--strategies checkfree --target-loss 3.0882 [--weighting W] [--lr-boost X --lr-boost-decay D]` (debug preset, 6
relay stages of one layer, seed 0, middle stages lost at steps 80 and 140; final val loss at step 200):
    weighting    norm 3.0590 < squared 3.0608 (both with 1.1x decaying over 50 steps): plain norms, the default.
    lr boost     1.0x 3.0550, 1.1x->1x over 50 steps 3.0590, 1.2x->1x over 50 steps 3.0456: 1.2x decaying, the
                 default. One seed and two failures: the differences are small (< 0.015 nats).
On this tiny model (one layer per stage, a few hundred steps) a random re-init, which is close to the identity on
the residual stream (i.e. to skipping the layer), recovers as well as or better than the CheckFree average; CheckFree
beats copying a neighbour. The paper's ordering against random is a claim about larger, longer-trained models.

A live relay calls its strategy's hooks (`RecoveryStrategy.handlers`, `on_serving`, `on_forward`, `on_step`,
`rebuild_live`, `close`); a data node asks it for each microbatch's `stage_order`. Nothing outside a strategy's own
class branches on its name.
"""

from gwtf.recovery.base import (
    LiveRelay,
    RebuiltStage,
    RecoveryError,
    RecoveryStrategy,
    install,
    live_neighbours,
    weighted_average,
)
from gwtf.recovery.baselines import CopyNeighbour, RandomInit
from gwtf.recovery.checkfree import WEIGHTINGS, CheckFree, CheckFreePlus, swap_order, swap_partner
from gwtf.recovery.checkpoint import Checkpoint, CheckpointRecovery, CheckpointStore
from gwtf.recovery.config import RecoveryConfig
from gwtf.recovery.failures import FailureSchedule, iteration_failure_probability
from gwtf.recovery.redundant import RedundantRecovery, Shadow, redundancy_cost, shadow_holder_stage, shadowed_stages
from gwtf.recovery.registry import STRATEGIES, make_strategy

__all__ = [
    "STRATEGIES",
    "WEIGHTINGS",
    "CheckFree",
    "CheckFreePlus",
    "Checkpoint",
    "CheckpointRecovery",
    "CheckpointStore",
    "CopyNeighbour",
    "FailureSchedule",
    "LiveRelay",
    "RandomInit",
    "RebuiltStage",
    "RecoveryConfig",
    "RecoveryError",
    "RecoveryStrategy",
    "RedundantRecovery",
    "Shadow",
    "install",
    "iteration_failure_probability",
    "live_neighbours",
    "make_strategy",
    "redundancy_cost",
    "shadow_holder_stage",
    "shadowed_stages",
    "swap_order",
    "swap_partner",
    "weighted_average",
]
