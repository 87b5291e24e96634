"""The run settings a scenario and a compared variant give a run: the one place the harness chooses them.

The gwtf swarm gets them as `--set section.field=value` arguments of `gwtf bootstrap` (which checks each and writes
the run config into the run record every node reads); the DeepSpeed baseline and the token counts load the same run
config in-process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gwtf.benchmarks.harness.scenario import Scenario

if TYPE_CHECKING:
    from gwtf.config import RunConfig


def recovery_of(sc: Scenario, variant: dict[str, str]) -> str:
    """The recovery strategy a variant runs (`--compare recovery=...`, else the scenario's)."""
    return variant.get("recovery", sc.recovery)


def router_of(sc: Scenario, variant: dict[str, str]) -> str:
    """The router a variant runs (`--compare router=...`, else the scenario's)."""
    return variant.get("router", sc.router)


def swarm_settings_argv(sc: Scenario, variant: dict[str, str]) -> list[str]:
    """`--set` arguments for `gwtf bootstrap`: the scenario's steps and seed, the variant's recovery strategy and
    the scenario's own `overrides` (any run setting), in that order (a later one wins)."""
    sets = [f"train.steps={sc.steps}", f"train.seed={sc.seed}", f"recovery.strategy={recovery_of(sc, variant)}",
            *sc.overrides]  # fmt: skip
    return sum((["--set", s] for s in sets), [])


def run_config(sc: Scenario) -> RunConfig:
    """The run config the DeepSpeed baseline trains with (the same model, stages, seed and overrides)."""
    from gwtf.config import load_config  # torch and transformers: not on import of the harness

    return load_config(None, [f"preset={sc.preset}", f"stages={sc.stages}", f"train.seed={sc.seed}", *sc.overrides])


def tokens_per_iteration(sc: Scenario) -> int:
    from gwtf.config import load_config

    cfg = load_config(None, [f"preset={sc.preset}", *sc.overrides])
    t = cfg.train
    return t.microbatches_per_step * t.microbatch_size * cfg.model_config().seq_len
