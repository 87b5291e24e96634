"""Nodes forked from the zygote (gwtf.launch.zygote, ProcessGroup(preload=True)) behave as plain processes do: own
session, log, exit codes as subprocess reports them, the launcher's signals; a zygote that cannot start leaves the
group starting plain processes; nothing outlives a launcher that is SIGKILLed."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from gwtf.launch.processes import ForkedProcess, ProcessGroup, leftovers
from gwtf.launch.zygote import PRELOAD_ENV


def test_a_forked_node_serves_logs_and_dies_as_a_plain_process_would(tmp_path):
    group = ProcessGroup(tmp_path, preload=True)
    try:
        helped = group.start("help", ["--help"])
        assert isinstance(helped, ForkedProcess) and group.zygote_pid is not None
        assert helped.wait(timeout=60) == 0 and "usage: gwtf" in group.log_text("help")
        bad = group.start("bad", ["join", "--no-such-flag"])
        assert bad.wait(timeout=60) == 2 and "required: --initial-peers, --run" in group.log_text("bad")
        assert group.failed() == ["bad"]
        del group.procs["bad"]  # (else every wait below gives up at once: a child failed)

        addr = tmp_path / "peers.txt"
        node = group.start("bootstrap", ["bootstrap", "--run", "z", "--addr-file", str(addr)])
        assert group.wait_for_address(addr, timeout=120)
        assert os.getpgid(node.pid) == node.pid  # its own session and process group, as start_new_session gives
        assert psutil.Process(node.pid).ppid() == group.zygote_pid
        assert "p2pd" in {c.name() for c in psutil.Process(node.pid).children(recursive=True)}
        group.kill("bootstrap")  # the crash: SIGKILL to its group, reaped by the zygote, reported here
        assert node.returncode == -signal.SIGKILL and "bootstrap" not in group.failed()
        deadline = time.monotonic() + 10
        while leftovers({node.pid}) and time.monotonic() < deadline:  # p2pd: its watchdog ends it
            time.sleep(0.2)
        assert leftovers({node.pid}) == []
    finally:
        zygote = group.zygote_pid
        group.stop_all()
    assert zygote is not None and not psutil.pid_exists(zygote)  # EOF ended it, and stop_all reaped it
    assert group.leftovers() == []


def test_a_zygote_that_cannot_start_leaves_plain_processes_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(PRELOAD_ENV, "gwtf_no_such_module")
    group = ProcessGroup(tmp_path, preload=True)
    try:
        with caplog.at_level(logging.WARNING, logger="gwtf.launch.processes"):
            proc = group.start("help", ["--help"])
        assert isinstance(proc, subprocess.Popen) and proc.wait(timeout=60) == 0
        (line,) = [r.getMessage() for r in caplog.records]
        assert "did not start: preloading failed: ModuleNotFoundError" in line and "plain process" in line
        assert group.zygote_pid is None and not group.preload
    finally:
        group.stop_all()


LAUNCHER = """
    import sys, time
    from pathlib import Path
    from gwtf.launch.processes import ProcessGroup
    out = Path(sys.argv[1])
    group = ProcessGroup(out, preload=True)
    node = group.start("bootstrap", ["bootstrap", "--run", "z", "--addr-file", str(out / "peers.txt")])
    group.wait_for_address(out / "peers.txt", timeout=120)
    print(group.zygote_pid, node.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.integration
def test_nothing_outlives_a_sigkilled_launcher(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LAUNCHER), str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    family: list[psutil.Process] = []
    try:
        line = launcher.stdout.readline() if launcher.stdout else ""
        zygote, node = (int(x) for x in line.split())
        family = [psutil.Process(node), *psutil.Process(node).children(recursive=True), psutil.Process(zygote)]
        launcher.kill()
        launcher.wait(timeout=10)
        gone, alive = psutil.wait_procs(family, timeout=30)  # the zygote sees EOF; the node, its parent gone
        assert not alive, [p.name() for p in alive]
    finally:
        launcher.kill()
        launcher.wait(timeout=10)
        for proc in family:  # orphaned once the launcher is gone: the conftest reaper no longer sees them
            with contextlib.suppress(psutil.Error):
                proc.kill()
