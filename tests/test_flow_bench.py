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
