"""A run's whole state on disk, to go on from after every node has stopped: `gwtf export` writes it, `gwtf bootstrap
--resume DIR` starts the run again from it.

    DIR/state/run.json          the run (id, config, the version: the step every stage is at), and per stage its
                                file's SHA-256
    DIR/state/stage-K.safetensors   stage K's parameters and both Adam moments (StageReplica.state()), K = 0..S
    DIR/state/stage-K.json          its meta: version, the optimizer's step per parameter, lr_scale, ...

The first replica of each stage loads its file (as the first replicas of a fine-tune load the staged checkpoint) and
serves at the saved version; later replicas download from it as in any run. The data node loads stage 0 and takes the
step, so the loss, the learning-rate schedule and the data order go on where they were: a resumed run computes what
the run would have computed had it never stopped (tests/test_resume.py checks the losses).

The state is the run's own (fp32 weights and moments), so a resumed run is exact; it is about three times the size of
the weights alone (`gwtf export --weights-only` leaves it out).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from gwtf.errors import UserError

STATE_DIR = "state"
MANIFEST = "run.json"
FORMAT = 1


def _stage_file(k: int) -> str:
    return f"stage-{k}.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_run_state(out_dir: str | Path, run_id: str, config: dict[str, Any], version: int,
                   states: list[tuple[dict[str, torch.Tensor], dict]]) -> Path:  # fmt: skip
    """Write stage 0..S's states (`StageReplica.state()`, all at `version`) under OUT_DIR/state; returns that."""
    from safetensors.torch import save_file

    versions = {int(meta["version"]) for _, meta in states}
    if versions != {version}:
        raise UserError(f"the stages' states are at versions {sorted(versions)}, not all at {version}")
    out = Path(out_dir) / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for k, (tensors, meta) in enumerate(states):
        path = out / _stage_file(k)
        save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(path))
        (out / f"stage-{k}.json").write_text(json.dumps(meta))
        files[str(k)] = _sha256(path)
    manifest = {"format": FORMAT, "run_id": run_id, "version": version, "config": config, "stages": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def state_dir(path: str | Path) -> Path:
    """The state directory of an export (DIR or DIR/state), or a one-line UserError saying what is missing."""
    p = Path(path)
    for candidate in (p / STATE_DIR, p):
        if (candidate / MANIFEST).is_file():
            return candidate.resolve()
    raise UserError(f"{path} holds no run state ({STATE_DIR}/{MANIFEST}): export the run with `gwtf export` "
                    "(without --weights-only) before it ends")  # fmt: skip


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The state's run.json, checked (its format, a version, a file per stage)."""
    d = state_dir(path)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{d / MANIFEST} cannot be read as a run state ({exc})") from exc
    if manifest.get("format") != FORMAT or type(manifest.get("version")) is not int or not manifest.get("stages"):
        raise UserError(f"{d / MANIFEST} is not a gwtf run state of format {FORMAT}")
    return manifest


def state_hash(path: str | Path) -> str:
    """One hash for the whole state (its manifest names every file's SHA-256): the run record carries it, and a node
    checks its own copy against it, as it checks a fine-tune's checkpoint."""
    return hashlib.sha256((state_dir(path) / MANIFEST).read_bytes()).hexdigest()[:16]


def load_stage_state(path: str | Path, k: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Stage k's (tensors, meta), its file checked against the manifest's SHA-256."""
    from safetensors.torch import load_file

    d, manifest = state_dir(path), read_manifest(path)
    expected = manifest["stages"].get(str(k))
    file = d / _stage_file(k)
    if expected is None or not file.is_file():
        raise UserError(f"{d} has no state for stage {k}: this export is of another run shape")
    if _sha256(file) != expected:
        raise UserError(f"{file} does not match its SHA-256 in {MANIFEST}: the file is damaged or was changed")
    meta = json.loads((d / f"stage-{k}.json").read_text())
    return load_file(str(file)), meta


def saved_stage(path: str, k: int, run_at: int, lacking: str,
                remedy: str = "copy it there") -> tuple[dict[str, torch.Tensor], dict] | None:  # fmt: skip
    """Stage k's saved state for its first holder in a resumed run, or None once the run has gone past the saved
    version (a stage lost later is the run's recovery's to rebuild). `lacking`: what the node has no other source for,
    in the one-line error when the state is not on this machine."""
    if not Path(path).is_dir():
        raise UserError(f"{lacking} and the run's saved state {path} is not on this machine: {remedy}")
    if run_at > read_manifest(path)["version"]:
        return None
    return load_stage_state(path, k)
