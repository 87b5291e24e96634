"""The crash-injection harness: its seeded schedule and report arithmetic, and one tiny scenario end to end
(real processes: a relay SIGKILLed, a volunteer joining, a report with plots and TensorBoard scalars, nothing left
running)."""

import dataclasses
import json
from pathlib import Path

import pytest

from gwtf.benchmarks import results_table
from gwtf.benchmarks.harness.compare import run_scenario, variants
from gwtf.benchmarks.harness.events import draw_events
from gwtf.benchmarks.harness.report import (
    build_report,
    live_from_timeline,
    repeat_summary,
    to_full_throughput,
    write_plots,
)
from gwtf.benchmarks.harness.results import RunResult
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
    assert run["time_to_target_s"] is not None and run["useful_tokens_per_s"] > 0
    assert run["useful_tokens_per_s"] == run["raw_tokens_per_s"]  # nothing was rolled back
    assert run["valid"] and not run["invalid_reasons"]
    live = run["live_harness"]  # the harness's kill and serve times: stage 2 down to 1 at the crash, 2 once joined
    assert live["per_stage"][0] == [1, 2] and [1, 1] in live["per_stage"] and live["per_stage"][-1] == [1, 2]
    killed_at = live["t"][live["per_stage"].index([1, 1])]
    assert killed_at == pytest.approx(crash["t"], abs=0.5)
    assert not run["leftover_pids"] and not run["failed_processes"]
    json.dumps(report)  # the report is plain JSON
    assert all(p.stat().st_size > 5000 for p in plots)
    scalars = read_scalars(tmp_path / "tb" / "tiny" / "base")  # one TensorBoard run per variant, live from data-0
    assert_rows_logged(scalars, result.rows)
    gaps = scalars["routing/throughput_gap"]  # one per iteration, unless a computation was still running
    assert gaps and all(0 <= step < sc.steps and 0 <= gap <= 1 for step, gap in gaps), gaps


def fake_run(label: str, seconds: float, steps: int = 10, done: bool = True, lost: int = 0, leftover=(),
             rolled_back: int = 0, timeline=()) -> RunResult:  # fmt: skip
    rows = [{"iteration": i, "t": seconds * (i + 1), "seconds": seconds, "loss": 6.0 - 0.2 * i, "lost": 0,
             "started": 4, "finished": 4, "live_per_stage": [1, 1], "rolled_back": int(i < rolled_back)}
            for i in range(steps + rolled_back)]  # fmt: skip
    if rows:
        rows[-1]["lost"] = lost
    return RunResult({"router": label}, "fake", rows, [], [], 0.0, seconds * steps, done, [], list(leftover), 100, "",
                     timeline=list(timeline))  # fmt: skip


def fake_scenario(seed: int = 0) -> Scenario:
    return Scenario("fake", stages=2, steps=10, target_loss=4.8, seed=seed, nodes=[NodeSpec(stage=1),
                    NodeSpec(stage=2)])  # fmt: skip


def test_ratios_leave_out_a_run_that_did_not_finish_lost_a_microbatch_or_left_a_process():
    sc = fake_scenario()
    good = build_report(sc, [fake_run("gwtf", 1.0), fake_run("swarm", 2.0)])
    (r,) = good["ratios"]
    assert r["time_per_iteration"] == 0.5 and r["useful_throughput"] == 2.0 and r["time_to_target"] == 0.5
    for bad in (fake_run("swarm", 2.0, steps=6, done=False), fake_run("swarm", 2.0, lost=1),
                fake_run("swarm", 2.0, leftover=[4242])):  # fmt: skip
        report = build_report(sc, [fake_run("gwtf", 1.0), bad])
        (r,) = report["ratios"]
        assert not report["runs"][1]["valid"] and r["invalid"]
        assert all(r[k] is None for k in ("time_to_target", "useful_throughput", "raw_throughput"))


def test_useful_and_raw_throughput_differ_by_the_steps_a_rollback_redid():
    run = build_report(fake_scenario(), [fake_run("deepspeed", 1.0, rolled_back=5)])["runs"][0]
    assert run["raw_tokens_per_s"] == pytest.approx(1.5 * run["useful_tokens_per_s"])  # 15 iterations, 10 count


def test_repeats_give_each_ratio_a_t_interval_over_the_valid_repeats_only():
    reports = [build_report(fake_scenario(seed), [fake_run("gwtf", 1.0), fake_run("swarm", s)])
               for seed, s in enumerate((2.0, 2.5, 4.0))]  # fmt: skip
    reports.append(build_report(fake_scenario(3), [fake_run("gwtf", 1.0), fake_run("swarm", 100.0, lost=2)]))
    summary = repeat_summary(reports)
    (r,) = summary["ratios"]
    tpi = r["time_per_iteration"]
    assert tpi["n"] == 3 and tpi["mean"] == pytest.approx((0.5 + 0.4 + 0.25) / 3, abs=1e-3)
    assert tpi["low"] < tpi["mean"] < tpi["high"]  # t with 2 degrees of freedom: 4.303 standard errors each side
    assert tpi["high"] - tpi["mean"] == pytest.approx(4.303 * 0.1258 / 3**0.5, rel=0.01)
    assert summary["invalid_runs"] == [{"seed": 3, "label": "router=swarm", "reasons": ["lost 2 microbatch(es)"]}]
    assert summary["variants"]["router=swarm"]["raw_tokens_per_s"]["n"] == 3


def test_the_results_table_is_made_from_the_reports_with_intervals_and_the_invalid_pairs_counted(tmp_path):
    def repeat(seed: int, swarm_s: float, lost: int = 0) -> dict:
        ds = fake_run("deepspeed", 2.0 * swarm_s)
        ds.variant = {"system": "deepspeed"}
        return build_report(fake_scenario(seed), [fake_run("gwtf", 1.0), fake_run("swarm", swarm_s, lost=lost), ds])

    reports = [repeat(0, 2.0), repeat(1, 2.5), repeat(2, 4.0), repeat(3, 2.0, lost=1)]
    path = tmp_path / "fake.json"
    path.write_text(json.dumps({"repeats": repeat_summary(reports), "reports": reports}))
    md, command = results_table.row(path)
    _, scenario, swarm, deepspeed, other, runs, _ = md.split("|")
    assert scenario.strip() == "fake" and other.strip() == ""
    assert "s/iteration 0.38 [" in swarm and "(n=3, 1 invalid left out)" in swarm  # seed 3's swarm run lost one
    assert "raw tokens/s" not in swarm and "raw tokens/s" in deepspeed and "(n=4)" in deepspeed
    assert "4 repeats, seeds [0, 1, 2, 3]; lost 1" in runs
    assert command.endswith(f"fake.toml --compare router=gwtf,swarm --repeats 4 --json {path}")  # rebuilt
    assert results_table.table([path]).count("\n| fake |") == 1


def test_live_relays_come_from_the_harness_kill_and_serve_times():
    timeline = [{"t": 0.0, "stage": 1, "delta": 1}, {"t": 0.0, "stage": 2, "delta": 1},
                {"t": 0.0, "stage": 2, "delta": 1}, {"t": 10.2, "stage": 2, "delta": -1},
                {"t": 10.2, "stage": 2, "delta": -1}, {"t": 12.6, "stage": 2, "delta": 1}]  # fmt: skip
    live = live_from_timeline(timeline, stages=2, end_s=30.0)
    assert live == {"t": [0.0, 10.2, 12.6, 30.0], "per_stage": [[1, 2], [1, 0], [1, 1], [1, 1]]}
    run = build_report(fake_scenario(), [fake_run("gwtf", 1.0, timeline=timeline)])["runs"][0]
    assert run["live_harness"]["per_stage"][1] == [1, 0]  # both SIGKILLed at 10.2 s, whatever the DHT said


def test_a_restarts_fixed_cost_counts_as_modelled_time_in_the_scaled_figures():
    sc = dataclasses.replace(fake_scenario(), time_scale=10.0)
    ds = fake_run("deepspeed", 1.0, steps=10)
    for row in ds.rows:  # attempt 2 starts 20 s after its restart at t = 5: 20 s of fixed cost
        row["attempt"] = 1 if row["iteration"] < 5 else 2
        if row["attempt"] == 2:
            row["t"] += 20.0
    ds.events = [{"t": 5.0, "action": "restart", "attempt": 2}]
    report = build_report(sc, [fake_run("gwtf", 1.0), ds])
    scaled = report["runs"][1]["restarts_scaled"]
    assert scaled["fixed_s"] == [pytest.approx(20.0)]
    assert report["runs"][1]["time_to_target_s"] == pytest.approx(29.0)  # step 8 ends at 9 s + the 20 s gap
    assert scaled["time_to_target_s_restarts_scaled"] == pytest.approx(29.0 - 18.0)  # the gap counts 20 / 10 s
    assert report["ratios"][0]["time_to_target_restarts_scaled"] == pytest.approx(9.0 / 11.0, abs=1e-3)
