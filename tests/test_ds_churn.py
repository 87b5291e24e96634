"""The DeepSpeed checkpoint-restart baseline: its bookkeeping (placement, crashes, restarts, rollbacks) without
processes, and (opt-in) a real run with a crash and a restart from the checkpoint."""

from pathlib import Path

import pytest

from gwtf.benchmarks.harness.compare import variants
from gwtf.benchmarks.harness.deepspeed_run import DeepSpeedRun, _mark_rollbacks, choose_dp
from gwtf.benchmarks.harness.events import Event
from gwtf.benchmarks.harness.scenario import Churn, NodeSpec, Scenario
from gwtf.errors import UserError


def scenario(**kw) -> Scenario:
    nodes = [NodeSpec(stage=1, count=3, speed=1.0), NodeSpec(stage=2, count=2, speed=2.0)]
    return Scenario("t", stages=2, steps=10, nodes=nodes, churn=Churn(min_per_stage=0, rejoin_after_s=None), **kw)


class Recorder(DeepSpeedRun):
    """Records job starts and kills instead of spawning DeepSpeed ranks."""

    def _start_job(self) -> None:
        self.attempt += 1
        self.procs = [object()]  # type: ignore[list-item]
        self.starts = [*getattr(self, "starts", []), dict(self.grid.ranks)]

    def _kill_job(self) -> None:
        self.procs = []


def test_dp_is_the_widest_that_divides_the_microbatches_and_every_stage_can_staff():
    assert choose_dp(8, [3, 3, 3]) == 2
    assert choose_dp(6, [3, 4]) == 3
    assert choose_dp(8, [1, 5]) == 1
    with pytest.raises(UserError, match="one machine per stage"):
        choose_dp(8, [2, 0])


def test_grid_takes_the_fastest_and_a_crash_restarts_on_a_spare_or_waits_for_a_joiner(tmp_path: Path):
    sc = scenario(overrides=["train.microbatches_per_step=4"])
    run = Recorder(sc, {"system": "deepspeed"}, tmp_path, [])
    assert run.dp == 2 and sorted(run.grid.machines()) == ["relay-s1-0-0", "relay-s1-1-1", "relay-s2-3-0",
                                                            "relay-s2-4-1"]  # fmt: skip
    run._start_job()
    # a spare's crash costs nothing
    out = run._kill(["relay-s1-2-2"], Event(1.0, "crash", "trace"))
    assert "job" not in out and run.attempt == 1
    # a stage-1 machine: no spare left there, so the job waits for a joiner of stage 1
    out = run._kill(["relay-s1-0-0"], Event(2.0, "crash", "trace"))
    assert "stopped" in out["job"] and run.procs == [] and run.attempt == 1
    run._do_join(Event(3.0, "join", "trace", slot=NodeSpec(stage=2)))
    assert run.procs == []  # a stage-2 joiner does not fill the stage-1 hole
    run._do_join(Event(4.0, "join", "trace", slot=NodeSpec(stage=1, speed=4.0)))
    assert run.attempt == 2 and run.starts[-1][(1, 0)] == "joiner-1"


def test_a_whole_stage_lost_stops_the_job_until_enough_joiners_arrive(tmp_path: Path):
    run = Recorder(scenario(overrides=["train.microbatches_per_step=4"]), {}, tmp_path, [])
    run._start_job()
    out = run._do_stage_loss(Event(1.0, "stage_loss", "trace", stage=2))
    assert sorted(out["victims"]) == ["relay-s2-3-0", "relay-s2-4-1"] and run.procs == []
    run._do_join(Event(2.0, "join", "trace", slot=NodeSpec(stage=None, count=2)))  # they pick the empty stage
    assert run.attempt == 2 and {run.machines[run.grid.ranks[(2, d)]].stage for d in range(2)} == {2}


def test_rolled_back_steps_count_once():
    rows = [{"time": 10.0 + i, "iteration": i, "attempt": 1, "finished": 4} for i in range(6)]
    rows += [{"time": 30.0 + i, "iteration": 4 + i, "attempt": 2, "finished": 4} for i in range(3)]
    marked = _mark_rollbacks(rows, 9.0)
    assert [r["rolled_back"] for r in marked] == [0, 0, 0, 0, 4, 4, 0, 0, 0]
    assert [r["finished"] for r in marked][4:6] == [0, 0] and marked[0]["t"] == 1.0


def test_system_is_a_compare_axis():
    assert variants(["system=gwtf,deepspeed"]) == [{"system": "gwtf"}, {"system": "deepspeed"}]
    both = variants(["router=gwtf,swarm", "system=gwtf,deepspeed"])  # router is gwtf's: DeepSpeed runs once
    gwtf, swarm = {"router": "gwtf", "system": "gwtf"}, {"router": "swarm", "system": "gwtf"}
    assert both == [gwtf, {"system": "deepspeed"}, swarm]
    with pytest.raises(UserError, match="systems are"):
        variants(["system=megatron"])


TINY_DS = """
name = "tinyds"
stages = 2
steps = 12
target_loss = 5.45
time_scale = 10.0
compute_ms = 10.0
timeout_s = 150
checkpoint_every = 3
overrides = ["train.eval_every=0", "train.microbatches_per_step=2"]
[churn]
min_per_stage = 0
[[nodes]]
stage = 1
region = "Iowa"
[[nodes]]
stage = 2
region = "Oregon"
count = 2
[[trace]]
at_s = 15.0
action = "crash"
node = "relay-s1-0-0"
[[trace]]
at_s = 25.0
action = "join"
stage = 1
"""


# Real DeepSpeed ranks (gloo, CPU) and a restart: about a minute; opt-in like the other DeepSpeed test.
@pytest.mark.deepspeed
@pytest.mark.timeout(400)
def test_deepspeed_baseline_restarts_from_its_checkpoint_after_a_crash(tmp_path: Path):
    from gwtf.benchmarks.harness.compare import run_scenario
    from gwtf.benchmarks.harness.report import build_report
    from gwtf.benchmarks.harness.scenario import load_scenario

    path = tmp_path / "tinyds.toml"
    path.write_text(TINY_DS)
    sc = load_scenario(path)
    (result,) = run_scenario(sc, ["system=deepspeed"], tmp_path / "logs")
    report = build_report(sc, [result])["runs"][0]
    assert result.done and not result.leftover_pids
    attempts = sorted({r["attempt"] for r in result.rows})
    steps = [r["iteration"] for r in result.rows]
    assert attempts == [1, 2], "the crash 1.5 s into the run stops the job once; the joiner restarts it"
    restart = [r["iteration"] for r in result.rows if r["attempt"] == 2][0]  # from the last checkpoint
    assert restart % 3 == 0 and restart <= max(r["iteration"] for r in result.rows if r["attempt"] == 1) + 1
    assert report["microbatches"]["rolled_back"] == 2 * sum(1 for r in result.rows if r["rolled_back"])
    assert sorted(set(steps)) == list(range(12)) and report["final_loss"] < 5.5
