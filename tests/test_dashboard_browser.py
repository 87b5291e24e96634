"""The dashboard page in a real browser (headless Chromium) on a swarm of processes started through the launcher: it
loads with nothing but loopback (its libraries are served from the package), shows every stage and replica, and
marks a relay SIGKILLed during the test dead within seconds, long before its record expires. A screenshot of the
page is saved in the test's tmp dir. The data model behind it is checked in process in tests/test_dashboard.py."""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from gwtf.launch.dashboard import dashboard_url, start_dashboard
from gwtf.launch.processes import ProcessGroup

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SETTINGS = [
    "data.max_bytes=300000",
    "train.microbatch_size=4",
    "train.microbatches_per_step=4",
    "train.steps=2000",
    "membership.record_ttl_s=30",
]  # fmt: skip  (a dead relay's record outlives the test's deadline)
DEAD_WITHIN_S = 12.0  # from the SIGKILL to the page's state saying so; the record would take 30 s to expire

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium)"),
]


def browser(url: str, profile: Path, screenshot: Path | None = None, budget_ms: int = 8000) -> str:
    """The page's DOM after its scripts ran (or a screenshot), in headless Chromium that resolves no host name but
    127.0.0.1 (and the page's own Content-Security-Policy allows its origin only)."""
    assert CHROMIUM is not None
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", f"--user-data-dir={profile}",
            "--window-size=1400,1650", f"--virtual-time-budget={budget_ms}"]  # fmt: skip
    argv += [f"--screenshot={screenshot}"] if screenshot is not None else ["--dump-dom"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def api_state(url: str) -> dict:
    with urllib.request.urlopen(url + "api/state", timeout=10) as response:
        return json.loads(response.read())


def wait_state(url: str, ready, timeout: float, group: ProcessGroup) -> dict:
    state: dict = {}

    def check() -> bool:
        nonlocal state
        state = api_state(url)
        return bool(ready(state))

    group.wait_until("the dashboard's state", check, timeout, poll_s=0.25)
    return state


def boxes(state: dict) -> dict[str, dict]:
    return {b["peer"]: b for st in state["stages"] for b in st["nodes"]}


def peer_of(group: ProcessGroup, name: str) -> str:
    found = re.search(r"^relay (\S+) serving stage \d+$", group.log_text(name), re.MULTILINE)  # the line it prints
    assert found, group.log_text(name)[-2000:]
    return found.group(1)


@pytest.mark.timeout(420)
def test_the_page_shows_every_replica_and_marks_a_sigkilled_relay_dead(tmp_path):
    group = ProcessGroup(tmp_path)
    stages = {f"relay-s{k}-{r}": k for k in (1, 2) for r in (0, 1)}  # 2 stages x 2 replicas
    relays = list(stages)
    try:
        run_id, addr_file = f"dash-{os.getpid()}", tmp_path / "initial_peers.txt"
        settings = [arg for s in SETTINGS for arg in ("--set", s)]
        argv = ["bootstrap", "--run", run_id, "--preset", "debug", "--stages", "2", "--router", "round-robin"]
        group.start("bootstrap", [*argv, "--addr-file", str(addr_file), *settings])
        peers = group.wait_for_address(addr_file, timeout=90)
        start_dashboard(group, peers, run_id, port=0)  # as `gwtf demo --dashboard` does: it sees every join
        join = ["join", "--run", run_id, "--initial-peers", *peers, "--capacity", "2"]
        for name, stage in stages.items():
            group.start(name, [*join, "--role", "relay", "--stage", str(stage)])
        group.wait_for_line(relays, "serving stage", timeout=180)
        group.start("data-0", [*join, "--role", "data", "--rank", "0", "--metrics", str(tmp_path / "data-0.jsonl")])
        url = dashboard_url(group)
        assert url.startswith("http://127.0.0.1:")
        ids = {name: peer_of(group, name) for name in relays}

        def all_serving(state: dict) -> bool:
            shown = boxes(state)
            return state["history"] and all(shown.get(p, {}).get("state") == "serving" for p in ids.values())

        wait_state(url, all_serving, timeout=180, group=group)
        dom = browser(url, tmp_path / "profile")
        assert 'data-ready="1"' in dom and 'data-libs="uplot,cytoscape"' in dom  # its libraries came from loopback
        assert all(src.startswith("/static/") for src in re.findall(r'(?:src|href)="([^"]+)"', dom))
        for k in (1, 2):
            assert f'data-stage="{k}"' in dom
        for peer in ids.values():
            assert re.search(rf'data-peer="{peer}" data-state="serving"', dom), peer

        victim = ids["relay-s2-1"]
        killed = time.monotonic()
        group.kill("relay-s2-1")  # SIGKILL, by pid, to the relay and what it started
        state = wait_state(url, lambda s: boxes(s)[victim]["state"] == "dead", timeout=60, group=group)
        took = time.monotonic() - killed
        print(f"relay marked dead {took:.1f}s after its SIGKILL")
        assert took < DEAD_WITHIN_S, f"marked dead {took:.1f}s after the SIGKILL"
        assert "probe found it gone" in boxes(state)[victim]["why"]  # not its record expiring (30 s)
        assert any(e["kind"] == "crash" and e["peer"] == victim for e in state["events"])

        dom = browser(url, tmp_path / "profile")
        assert re.search(rf'data-peer="{victim}" data-state="dead"', dom)
        shot = tmp_path / "dashboard.png"
        browser(url, tmp_path / "profile", screenshot=shot)
        assert shot.stat().st_size > 20_000  # a page, not a blank
    finally:
        group.stop_all()
    assert not group.failed(), group.failed()
    assert not group.leftovers()
