"""gwtf.benchmarks.flow end to end on a tiny swarm: the summary it writes, with and without cross-relay exchanges."""

import json

import pytest

from gwtf.benchmarks import flow


@pytest.mark.parametrize("exchange", [False, True])
def test_flow_benchmark_writes_its_summary(tmp_path, exchange):
    out = tmp_path / "flow.json"
    argv = ["--nodes", "40", "--stages", "4", "--seeds", "1", "--rounds", "30", "--iterations", "1"]
    assert flow.main(argv + ["--json", str(out)] + (["--exchange"] if exchange else [])) == 0
    summary = json.loads(out.read_text())
    assert summary["exchange"] is exchange and len(summary["runs"]) == 1
    assert 0 < summary["optimality_ratio_min"] <= 1.0  # measured against the optimum of the same run
    assert summary["worst_path_cost_ratio_mean"] > 0 and summary["iteration_time_vs_swarm"] > 0


def test_flow_benchmark_times_the_optimums_plan_on_request(tmp_path):
    out = tmp_path / "flow.json"
    argv = ["--nodes", "40", "--stages", "4", "--seeds", "1", "--rounds", "30", "--iterations", "1", "--oracle-timing"]
    assert flow.main(argv + ["--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["oracle_iteration_time_vs_swarm"] > 0
    assert "oracle_iteration_time_vs_swarm" in summary["runs"][0]


def test_mean_ci_is_students_t_interval_and_leaves_out_what_has_no_value():
    from gwtf.benchmarks.stats import fmt, mean_ci, t975

    ci = mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3: half-width t(2) * 1 / sqrt(3)
    assert ci["mean"] == 2.0 and ci["n"] == 3
    assert ci["high"] - ci["mean"] == pytest.approx(4.303 / 3**0.5, rel=1e-4)
    assert mean_ci([5.0]) == {"mean": 5.0, "low": 5.0, "high": 5.0, "n": 1}
    assert mean_ci([2.0, float("inf"), None, float("nan"), 4.0])["n"] == 2  # a run that never reached its target
    assert mean_ci([])["n"] == 0 and fmt(mean_ci([])) == "n/a (no valid run)"
    assert t975(30) == 2.042 and 1.96 < t975(100) < t975(31) < 2.042
    with pytest.raises(ValueError):
        t975(0)
