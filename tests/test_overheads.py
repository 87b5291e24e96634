"""What benchmarks.throughput reports about a swarm's overheads, from its parts: process kinds, DHT operations per
step by node kind, PSS per node from /proc, CPU per thread kind from /proc (threads named by gwtf.lifecycle), medians
over repeats."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from gwtf.benchmarks.throughput import (
    _cpu_by_thread,
    _median_dicts,
    _pss_by_kind,
    _thread_cpu_seconds,
    _thread_delta,
    dht_ops_by_kind,
    process_kind,
    pss_by_node,
)
from gwtf.lifecycle import COMPUTE_THREAD, DHT_THREAD, name_os_thread, os_named


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


LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads' OS names: Linux's /proc")


@LINUX_PROC
def test_cpu_per_thread_kind_from_the_names_threads_give_the_os() -> None:
    """A node's threads name themselves for the operating system; the benchmark reads each one's CPU from /proc and
    sums it by kind: the main thread is the event loop, unnamed threads are "other"."""
    burn, stop = threading.Event(), threading.Event()

    def spin() -> None:  # CPU on a thread named as a node's compute thread
        burn.set()
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=os_named(COMPUTE_THREAD, spin))
    idle = threading.Thread(target=os_named(DHT_THREAD, stop.wait))
    plain = threading.Thread(target=stop.wait)
    procs = SimpleNamespace(procs={"relay-s1": SimpleNamespace(pid=os.getpid())})
    for t in (worker, idle, plain):
        t.start()
    try:
        burn.wait(5)
        before = _thread_cpu_seconds(procs)  # type: ignore[arg-type]
        kinds = {kind for _, kind, _ in before.values()}
        assert {"event loop", "compute", "DHT", "other"} <= kinds
        assert Path(f"/proc/self/task/{idle.native_id}/comm").read_text().strip() == DHT_THREAD
        sum(range(3_000_000))  # the main thread's own share, while the worker spins on
        after = _thread_cpu_seconds(procs)  # type: ignore[arg-type]
    finally:
        stop.set()
        for t in (worker, idle, plain):
            t.join()
    spent = _thread_delta(before, after)["relay-s1"]
    assert spent["compute"] > 0 and spent.get("DHT", 0.0) < 0.05
    per_step = _cpu_by_thread({"timed_steps": 2, "cpu_seconds_by_thread": {"relay-s1": spent, "relay-s2": {}}})
    assert per_step["relay"]["compute"] == round(spent["compute"] / 2 / 2, 4)  # per step, mean over the 2 relays
    assert per_step["all nodes"]["compute"] == round(spent["compute"] / 2, 4)


@LINUX_PROC
def test_naming_a_thread_is_best_effort() -> None:
    names: list[str] = []

    def run() -> None:
        name_os_thread("")  # an empty name is refused by the kernel: nothing happens, nothing is raised
        name_os_thread("x" * 100)  # cut to the 15 bytes Linux keeps
        names.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert names == ["x" * 15]
