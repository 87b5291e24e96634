"""Bytes a redundant (Bamboo) shadow receives per step, full state download vs delta refresh, measured on the
in-process swarm of tests/test_redundant.py (debug preset, 3 relay stages x 1 replica, 4 steps); in both modes every
shadow is checked bit for bit equal to its stage (weights, Adam moments, steps, version) after every step.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python docs/results/redundant_delta_refresh.py OUT.json
"""

import json
import sys

import pytest

from tests import test_redundant

STEPS = 4


def measure(deltas: bool) -> dict:
    patch = pytest.MonkeyPatch()
    try:
        return test_redundant._shadow_bytes_per_step(deltas, patch, STEPS)
    finally:
        patch.undo()


def main(path: str) -> None:
    after, before = measure(True), measure(False)
    rows = []
    for (holder, stage), (got, deltas, full, numel) in sorted(after.items()):
        old = before[(holder, stage)][0]
        rows.append({"holder_stage": holder, "shadowed_stage": stage, "trainable_parameters": numel,
                     "full_download_bytes_per_step": old / STEPS, "delta_bytes_per_step": got / STEPS,
                     "steps_by_delta": deltas, "full_downloads_with_deltas": full, "ratio": old / got})  # fmt: skip
    out = {
        "what": "bytes a shadow receives per step to stay in step: before, the full state (weights + two Adam moments, "
        "fp32); after, the stage's averaged gradients (fp32) applied as the same optimizer step, checked by the "
        "weights hash the replica sends",
        "setup": f"in-process swarm, debug preset, 3 relay stages x 1 replica, recovery=redundant, {STEPS} steps",
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python docs/results/redundant_delta_refresh.py OUT.json",
        "total_bytes_per_step_before": sum(r["full_download_bytes_per_step"] for r in rows),
        "total_bytes_per_step_after": sum(r["delta_bytes_per_step"] for r in rows),
        "shadows": rows,
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
