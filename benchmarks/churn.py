"""The crash-injection harness's command (the harness itself is the package benchmarks/harness/):

    python -m gwtf.benchmarks.churn --scenario benchmarks/scenarios/geo10.toml --compare router=gwtf,swarm \
        --json runs/geo10.json --plots docs/plots

See benchmarks/harness/cli.py for what it does, and `--help`. The names below are re-exported for code that imports
them from here (benchmarks/plan_bounds.py, tests/test_plan_bounds.py, tests/test_redundant.py); new code imports them
from their modules in benchmarks/harness/.
"""

from __future__ import annotations

import sys

from gwtf.benchmarks.harness.cli import main
from gwtf.benchmarks.harness.scenario import Scenario, load_scenario
from gwtf.benchmarks.harness.swarm_run import REDUNDANT_COST, redundancy_cost

__all__ = ["REDUNDANT_COST", "Scenario", "load_scenario", "main", "redundancy_cost"]

if __name__ == "__main__":
    sys.exit(main())
