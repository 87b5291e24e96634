"""The crash-injection harness: its seeded schedule and report arithmetic, and one tiny scenario end to end
(real processes: a relay SIGKILLed, a volunteer joining, a report with plots and TensorBoard scalars, nothing left
running)."""

import dataclasses
import json
from pathlib import Path

import pytest

from gwtf.benchmarks.harness.compare import run_scenario, variants
from gwtf.benchmarks.harness.events import draw_events
from gwtf.benchmarks.harness.report import build_report, to_full_throughput, write_plots
from gwtf.benchmarks.harness.scenario import Churn, NodeSpec, Scenario, load_scenario
from gwtf.errors import UserError
from tests.test_tensorboard import assert_rows_logged, read_scalars

SCENARIOS = Path(__file__).resolve().parents[1] / "benchmarks" / "scenarios"

TINY = """
name = "tiny"
stages = 2
steps = 60
target_loss = 5.4
time_scale = 10.0
compute_ms = 20.0
timeout_s = 100
overrides = ["train.eval_every=0"]
[[nodes]]
stage = 1
[[nodes]]
stage = 2
count = 2
[[trace]]
at_s = 10.0
action = "crash"
stage = 2
[[trace]]
at_s = 12.0
action = "join"
stage = 2
"""


def test_shipped_scenarios_load_and_draw_the_same_events_for_the_same_seed():
    names = {p.stem for p in SCENARIOS.glob("*.toml")}
    assert {"local", "geo10", "geo10-heavy", "stage-loss", "join-wave"} <= names
    for path in SCENARIOS.glob("*.toml"):
        sc = load_scenario(path)
        assert [(e.t, e.action) for e in draw_events(sc, 600)] == [(e.t, e.action) for e in draw_events(sc, 600)]
    heavy, light = load_scenario(SCENARIOS / "geo10-heavy.toml"), load_scenario(SCENARIOS / "geo10.toml")
    assert len(draw_events(heavy, 3600)) > 2 * len(draw_events(light, 3600)) > 0


def test_rates_are_per_modelled_hour_and_stages_need_relays():
    with pytest.raises(UserError, match="no relay"):
        Scenario("r", stages=2, nodes=[NodeSpec(stage=1)])
    sc = Scenario("r", stages=1, time_scale=3600.0, nodes=[NodeSpec(stage=1, count=10)], churn=Churn(0.5))
    counts = [len(draw_events(dataclasses.replace(sc, seed=s), 100.0)) for s in range(20)]
    # 10 relays x 0.5 per modelled hour, one modelled hour per wall second: about 5 crashes per wall second
    assert 400 < sum(counts) / 20 < 600


def test_compare_variants_and_their_errors():
    assert variants(["router=gwtf,swarm"]) == [{"router": "gwtf"}, {"router": "swarm"}]
    assert len(variants(["router=gwtf,swarm", "recovery=checkfree,copy"])) == 4
    assert variants([]) == [{}]
    with pytest.raises(UserError, match="KEY=V1,V2"):
        variants(["speed=1,2"])


def test_a_recovery_the_live_swarm_lacks_is_refused_before_anything_starts(tmp_path):
    from gwtf.recovery.config import RecoveryConfig

    sc = load_scenario("benchmarks/scenarios/stage-loss.toml")
    with pytest.raises(UserError, match="system=gwtf,deepspeed"):  # checkpoint restart is DeepSpeed's, here
        run_scenario(sc, ["recovery=checkfree,checkpoint"], tmp_path / "logs")
    with pytest.raises(UserError, match="recovery.strategy='chekfree' is unknown"):
        run_scenario(sc, ["recovery=chekfree"], tmp_path / "logs")
    assert not (tmp_path / "logs").exists()  # nothing was started
    with pytest.raises(UserError, match="not a live swarm mode"):
        RecoveryConfig(strategy="checkpoint")
    assert RecoveryConfig(strategy="redundant").strategy == "redundant"


def test_time_to_full_throughput():
    rows = [{"t": float(t), "seconds": 1.0} for t in range(1, 11)]
    tps = [100, 100, 100, 100, 10, 10, 100, 100, 100, 100]
    assert to_full_throughput(rows, [float(v) for v in tps], t_crash=4.5) == pytest.approx(1.5)  # starts at t=6
    assert to_full_throughput(rows, [100.0] * 10, t_crash=4.5) == 0.0
    assert to_full_throughput(rows, [100.0] * 4 + [10.0] * 6, t_crash=4.5) is None


# About 60 s on a quiet 2-core machine (process start-up, a call timeout, a joiner catching up): in the fast tier,
# like the process swarm tests, because it is the end-to-end proof that the harness works.
@pytest.mark.timeout(300)
def test_tiny_scenario_end_to_end_crash_rejoin_report(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    sc = load_scenario(path)
    (result,) = run_scenario(sc, [], tmp_path / "logs", tensorboard=tmp_path / "tb")
    report = build_report(sc, [result])
    plots = write_plots(report, tmp_path / "plots")
    run = report["runs"][0]
    assert run["done"] and run["steps"] == sc.steps, Path(result.log_dir, "data-0.log").read_text()[-3000:]
    assert run["microbatches"]["lost"] == 0
    assert run["microbatches"]["started"] == run["microbatches"]["finished"] + run["microbatches"]["partial"]
    (crash,) = run["crashes"]
    assert crash["stage"] == 2 and crash["victims"][0].startswith("relay-s2")
    joins = [e for e in run["events"] if e["action"] == "join"]
    assert "serving stage 2" in Path(result.log_dir, f"{joins[0]['joiners'][0]}.log").read_text()
    assert run["series"]["live_per_stage"][-1] == [1, 2]  # the dead relay is gone, the joiner serves
    assert run["final_loss"] < run["series"]["loss"][0]
    assert run["time_to_target_s"] is not None and run["tokens_per_s"] > 0
    assert not run["leftover_pids"] and not run["failed_processes"]
    json.dumps(report)  # the report is plain JSON
    assert all(p.stat().st_size > 5000 for p in plots)
    scalars = read_scalars(tmp_path / "tb" / "tiny" / "base")  # one TensorBoard run per variant, live from data-0
    assert_rows_logged(scalars, result.rows)
    gaps = scalars["routing/throughput_gap"]  # one per iteration, unless a computation was still running
    assert gaps and all(0 <= step < sc.steps and 0 <= gap <= 1 for step, gap in gaps), gaps
