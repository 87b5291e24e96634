"""The crash-injection harness's command (the harness itself is the package benchmarks/harness/):

    python -m gwtf.benchmarks.churn --scenario benchmarks/scenarios/geo10.toml --compare router=gwtf,swarm \
        --json runs/geo10.json --plots docs/plots

See benchmarks/harness/cli.py for what it does, and `--help`.
"""

from __future__ import annotations

import sys

from gwtf.benchmarks.harness.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
