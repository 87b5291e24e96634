"""A run stopped entirely goes on from its exported state (gwtf.resume): the losses after the stop are those of the run
that never stopped, and what is missing or damaged is said in one line."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gwtf.config import to_dict
from gwtf.errors import UserError
from gwtf.resume import load_stage_state, read_manifest, save_run_state, state_hash
from tests.support import InProcessSwarm
from tests.test_swarm_inprocess import fast_swarm, small_config

STOP = 3  # steps before the stop
STEPS = 6


async def _run(cfg, steps: int, save_to: Path | None = None) -> list[float]:
    swarm = InProcessSwarm(cfg, replicas=2, settings=fast_swarm())
    await swarm.start()
    try:
        losses = []
        for _ in range(steps):
            result = await swarm.step()
            losses.append(result.loss)
            hashes = result.reports[0].weight_hashes  # {stage: (replicas that reported, distinct weight hashes)}
            assert all(hashes[k] == (2, 1) for k in (1, 2)), hashes  # both replicas of each stage identical
        if save_to is not None:  # what `gwtf export` fetches from the live nodes: every stage's state, one version
            data = swarm.data_nodes[0]
            states = [data.stage0.state()]
            for k in range(1, swarm.spec.model.n_stages + 1):
                relay = next(n for n in swarm.relays.values() if n.stage == k)
                states.append(relay.replica.state())
            save_run_state(save_to, swarm.spec.run_id, to_dict(cfg), data.stage0.version, states)
        return losses
    finally:
        await swarm.close()


def test_a_stopped_run_resumes_from_its_saved_state_as_if_it_never_stopped(tmp_path) -> None:
    cfg = small_config(steps=STEPS, stages=2)
    whole = asyncio.run(asyncio.wait_for(_run(cfg, STEPS), timeout=100))
    before = asyncio.run(asyncio.wait_for(_run(cfg, STOP, save_to=tmp_path), timeout=100))
    assert before == pytest.approx(whole[:STOP], abs=1e-5)
    assert read_manifest(tmp_path)["version"] == STOP
    # Every node of the first run has stopped. The run starts again from the files alone: each stage's first replica
    # loads its state (weights, both Adam moments, the optimizer's step), the data node stage 0 and the step.
    resumed = dataclasses.replace(cfg, resume=str(tmp_path / "state"))
    after = asyncio.run(asyncio.wait_for(_run(resumed, STEPS - STOP), timeout=100))
    assert after == pytest.approx(whole[STOP:], abs=1e-4)


def test_a_damaged_or_missing_state_is_refused_in_one_line(tmp_path) -> None:
    with pytest.raises(UserError, match="holds no run state"):
        read_manifest(tmp_path)
    tensors = {"param/w": __import__("torch").ones(3)}
    meta = {"version": 2, "steps": {"w": 2.0}}
    save_run_state(tmp_path, "r", {}, 2, [(tensors, meta)])
    before = state_hash(tmp_path)
    assert load_stage_state(tmp_path, 0)[1]["version"] == 2
    with pytest.raises(UserError, match="no state for stage 1"):
        load_stage_state(tmp_path, 1)
    (tmp_path / "state" / "stage-0.safetensors").write_bytes(b"x" * 64)
    with pytest.raises(UserError, match="does not match its SHA-256"):
        load_stage_state(tmp_path, 0)
    with pytest.raises(UserError, match="not all at 3"):
        save_run_state(tmp_path, "r", {}, 3, [(tensors, meta)])
    manifest = json.loads((tmp_path / "state" / "run.json").read_text())
    (tmp_path / "state" / "run.json").write_text(json.dumps({**manifest, "version": 9}))
    assert state_hash(tmp_path) != before  # a node's copy that differs from the run's is told apart


def _bootstrap_args(*argv: str):
    import argparse

    from gwtf.launch.bootstrap import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--run", "again", *argv])


def test_bootstrap_resume_takes_the_saved_config_and_refuses_what_would_not_fit(tmp_path) -> None:
    from gwtf.launch.bootstrap import build_record

    cfg = small_config(steps=4, stages=2)
    tensors = {"param/w": __import__("torch").ones(3)}
    save_run_state(tmp_path, "first", to_dict(cfg), 4, [(tensors, {"version": 4, "steps": {}})] * 3)
    with pytest.raises(UserError, match="holds no run state"):
        build_record(_bootstrap_args("--resume", str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="leave out --preset"):
        build_record(_bootstrap_args("--resume", str(tmp_path), "--preset", "debug"))
    with pytest.raises(UserError, match=r"at step 4 of train.steps=4: .*--set train.steps=8"):
        build_record(_bootstrap_args("--resume", str(tmp_path)))
    with pytest.raises(UserError, match="may not change the model"):
        build_record(_bootstrap_args("--resume", str(tmp_path), "--set", "train.steps=8", "--set", "model.n_layers=6"))
    record = build_record(_bootstrap_args("--resume", str(tmp_path), "--set", "train.steps=8"))
    run = record.config["run"]
    assert run["resume"] == str((tmp_path / "state").resolve()) and run["train"]["steps"] == 8
    assert run["optim"] == to_dict(cfg)["optim"] and record.config["resume_hash"] == state_hash(tmp_path)
    # A joiner's own copy of the state must be the run's: another one is refused in one line.
    from gwtf.launch.join import _check_local_copy

    _check_local_copy(run["resume"], record.config["resume_hash"], "saved state")
    with pytest.raises(UserError, match="this is another saved state"):
        _check_local_copy(run["resume"], "0" * 16, "saved state")


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_run_exported_stopped_and_resumed_by_the_cli_goes_on_as_if_it_never_stopped(tmp_path) -> None:
    """As a user does it: a run of processes, `gwtf export` while its data node lingers, every node stopped, then
    `gwtf bootstrap --resume` and new nodes; the losses before and after are the uninterrupted run's."""
    from gwtf.config import load_config
    from gwtf.launch.processes import ProcessGroup, read_jsonl
    from gwtf.trainer import train_local

    settings = ["data.max_bytes=300000", "train.microbatch_size=4", "train.microbatches_per_step=4",
                "optim.warmup_steps=3", "train.eval_every=0", "membership.heartbeat_s=0.5",
                "membership.record_ttl_s=4.0"]  # fmt: skip
    flags = [arg for s in settings for arg in ("--set", s)]
    reference = train_local(load_config(None, [*settings, "stages=2", f"train.steps={STEPS}"]), progress=False)

    def run(group: ProcessGroup, name: str, bootstrap: list[str], metrics: Path, linger: bool) -> list[str]:
        addr = tmp_path / f"{name}.addr"
        group.start(f"bootstrap-{name}", ["bootstrap", "--run", name, "--open", "--addr-file", str(addr), *bootstrap])
        peers = group.wait_for_address(addr, timeout=90)
        join = ["join", "--run", name, "--initial-peers", *peers]
        for stage in (1, 2):
            group.start(f"{name}-relay-s{stage}", [*join, "--stage", str(stage)])
        group.wait_for_line([f"{name}-relay-s1", f"{name}-relay-s2"], "serving stage", timeout=240)
        group.start(f"{name}-data", [*join, "--role", "data", "--metrics", str(metrics), *(["--linger"] * linger)])
        done = lambda: any(r.get("event") == "done" for r in read_jsonl(metrics))  # noqa: E731
        group.wait_until(f"{name}'s last step", done, timeout=300)
        return peers

    def losses(metrics: Path) -> list[float]:
        return [r["loss"] for r in read_jsonl(metrics) if r.get("event") == "iteration"]

    export = tmp_path / "export"
    group = ProcessGroup(tmp_path, ok_exits=(0, -15, 130))
    try:
        first = tmp_path / "first.jsonl"
        peers = run(group, "first", ["--preset", "debug", "--stages", "2", "--set", f"train.steps={STOP}", *flags],
                    first, linger=True)  # fmt: skip
        out = subprocess.run([sys.executable, "-m", "gwtf.launch.cli", "export", "--run", "first", "--initial-peers",
                              *peers, "--to", str(export)], capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"its state at step {STOP}" in out.stdout, out.stdout
    finally:
        group.stop_all()
    group = ProcessGroup(tmp_path, ok_exits=(0, -15, 130))
    try:
        second = tmp_path / "second.jsonl"
        run(group, "second", ["--resume", str(export), "--set", f"train.steps={STEPS}"], second, linger=False)
    finally:
        group.stop_all()
    assert losses(first) == pytest.approx(reference["losses"][:STOP], abs=1e-4)
    steps = [r["iteration"] for r in read_jsonl(second) if r.get("event") == "iteration"]
    assert steps == list(range(STOP, STEPS))  # the step count goes on
    assert losses(second) == pytest.approx(reference["losses"][STOP:], abs=1e-4)  # and the loss, exactly
