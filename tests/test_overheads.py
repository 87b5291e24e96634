"""What benchmarks.throughput reports about a swarm's overheads, from its parts: process kinds, DHT operations per
step by node kind, PSS per node from /proc, medians over repeats."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from gwtf.benchmarks.throughput import _median_dicts, _pss_by_kind, dht_ops_by_kind, process_kind, pss_by_node


def test_process_kinds() -> None:
    assert process_kind("relay-s1") == "node"
    assert process_kind("relay-s1/p2pd") == "p2pd"
    assert process_kind("data-0/torch_shm_manager") == "torch_shm_manager"
    assert process_kind("relay-s1/sh") == "watchdog"  # gwtf.lifecycle's, for p2pd
    assert process_kind("relay-s2/python3.11") == "DHT process"  # hivemind.DHT's: a fork of the node


def test_dht_ops_by_node_kind_are_means_per_node() -> None:
    per_step = {"relay-s1": {"read nodes": 1.0, "write nodes": 0.5}, "relay-s2": {"read nodes": 0.0},
                "data-0": {"write telemetry": 1.0}}  # fmt: skip
    kinds = dht_ops_by_kind(per_step)
    assert kinds["relay"] == {"read nodes": 0.5, "write nodes": 0.25, "all": 0.75}
    assert kinds["data"] == {"write telemetry": 1.0, "all": 1.0}


def test_median_over_repeats_nested() -> None:
    runs = [{"relay": {"all": 1.0}, "x": 3.0}, {"relay": {"all": 5.0}, "x": 1.0}, {"relay": {"all": 2.0}}]
    assert _median_dicts(runs) == {"relay": {"all": 2.0}, "x": 2.0}


def test_pss_of_a_node_and_its_children_from_proc() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        procs = SimpleNamespace(procs={"relay-s1": SimpleNamespace(pid=os.getpid())}, zygote_pid=None)
        sizes = pss_by_node(procs)["relay-s1"]  # type: ignore[arg-type]
        assert sizes["node"] > 1 and sizes["DHT process"] > 1  # the child counts as a forked helper process
        pss = {k: v for k, v in sizes.items() if k != "all" and not k.startswith("private ")}
        assert abs(sizes["all"] - sum(pss.values())) < 0.5  # (rounded per kind)
        assert all(0 < sizes[f"private {k}"] <= v + 0.1 for k, v in pss.items())  # private pages: part of the PSS
        assert _pss_by_kind({"relay-s1": sizes, "relay-s2": {"node": 0.0, "all": 0.0}})["relay"]["all"] == round(
            sizes["all"] / 2, 1
        )
        # nodes forked from a zygote carry an even share of its PSS (here the child stands in for the zygote)
        procs.zygote_pid = child.pid
        procs.procs["relay-s2"] = SimpleNamespace(pid=os.getpid())
        forked = pss_by_node(procs)  # type: ignore[arg-type]
        share = forked["relay-s1"]["zygote share"]
        assert share > 0 and forked["relay-s2"]["zygote share"] == share
        assert forked["relay-s1"]["all"] == pytest.approx(forked["relay-s1"]["node"] + forked["relay-s1"].get(
            "DHT process", 0) + share, abs=0.5)  # fmt: skip
    finally:
        child.kill()
        child.wait()
