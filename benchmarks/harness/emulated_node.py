"""A gwtf process with an emulated compute speed: what the harness starts for every node of a scenario.

    python -m gwtf.benchmarks.harness.emulated_node --speed S --compute-ms C -- GWTF-ARGS

A relay started with `speed` s and the scenario's `compute_ms` c sleeps c/s ms per forward (2x per backward, 3x
per recompute) in its compute thread, on top of the real (tiny, debug-preset) compute; so its measured compute
time, which the routers read from its record, reflects the emulated speed. Other nodes run the `gwtf` CLI as is.
"""

from __future__ import annotations

import argparse
import sys
import time

MODULE = "gwtf.benchmarks.harness.emulated_node"


def entry(speed: float, compute_ms: float) -> tuple[str, ...]:
    """The launcher `entry` (gwtf.launch.processes) that runs a node through this wrapper."""
    return ("-m", MODULE, "--speed", str(speed), "--compute-ms", str(compute_ms), "--")


def emulate_compute(forward_s: float) -> None:
    """Stretch a relay's forward/backward/recompute as on a device `speed` times the base one (sleeping in the
    compute thread holds it busy like real work, without taking CPU from the other processes on this machine)."""
    from gwtf.recovery.redundant import Shadow
    from gwtf.stage import StageReplica

    slow = [(StageReplica, "forward", 1), (StageReplica, "backward", 2), (StageReplica, "recompute_backward", 3),
            (Shadow, "forward", 1)]  # recovery="redundant": a shadow's forward costs one more forward  # fmt: skip
    for cls, name, factor in slow:
        original = getattr(cls, name)

        def slowed(self, *a, _original=original, _s=forward_s * factor):
            out = _original(self, *a)
            time.sleep(_s)
            return out

        setattr(cls, name, slowed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--compute-ms", type=float, default=0.0)
    parser.add_argument("gwtf", nargs=argparse.REMAINDER)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    gwtf_argv = args.gwtf[1:] if args.gwtf[:1] == ["--"] else args.gwtf
    if args.compute_ms > 0 and "relay" in gwtf_argv:
        emulate_compute(args.compute_ms / 1000 / args.speed)
    from gwtf.launch.cli import main as gwtf

    return gwtf(gwtf_argv)


if __name__ == "__main__":
    sys.exit(main())
