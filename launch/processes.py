"""The one process launcher: gwtf processes on this machine, each with its log file, ended by pid whatever happens.

    group = ProcessGroup(Path("runs/demo"))
    group.start("bootstrap", ["bootstrap", "--run", "r", "--addr-file", "runs/demo/initial_peers.txt"])
    peers = group.wait_for_address(Path("runs/demo/initial_peers.txt"), timeout=60)
    group.start("relay-s1-0", ["join", "--run", "r", "--initial-peers", *peers, "--role", "relay"])
    group.wait_for_line(["relay-s1-0"], "serving stage", timeout=180)
    ...
    group.stop_all()                              # SIGTERM, then SIGKILL after `grace`; every child reaped

Every child is `python -m gwtf.launch.cli ARGV` by default (`entry` puts another module or a wrapper such as
cProfile in front), writes stdout and stderr to `LOG_DIR/NAME.log`, runs with one intra-op thread and the Hugging
Face hub offline, and leads its own session: its process group (id = its pid) holds what it starts (hivemind's DHT
process, p2pd), also once a crash orphans them, so a signal to the group reaches the whole node. A child learns
this launcher's pid (gwtf.lifecycle.PARENT_ENV) and stops itself once the launcher is gone, even SIGKILLed; SIGTERM to
the launcher stops every child as Ctrl-C does. A group made with
`own_sessions=False` keeps its children in the caller's session (and so in its scheduling group: with Linux's
autogroup scheduling the CPU is shared per session, which a throughput measurement must not change) and signals
each by its own pid only. Every wait here is bounded and gives up (UserError) as soon as a child exits early.
`gwtf demo`, `gwtf finetune`, the benchmarks (throughput, soak, the churn harness) and the tests start their
processes through this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gwtf.errors import UserError
from gwtf.lifecycle import PARENT_ENV

CLI = ("-m", "gwtf.launch.cli")  # what a child runs unless `entry` says otherwise
BASE_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
# Exits that are not a failure: a clean one, and the signals a crash (injected or the harness's) or a stop sends.
NOT_FAILED = (0, -signal.SIGKILL, -signal.SIGTERM)
# gwtf.launch.cli's exit after KeyboardInterrupt: a node maps SIGTERM to it, so a child `stop_all` stopped exits so
INTERRUPTED_EXIT = 130
REAP_TIMEOUT_S = 10.0  # how long a SIGKILLed child may take to be reaped


def profiled(path: Path) -> tuple[str, ...]:
    """An `entry` that runs the gwtf CLI under cProfile, writing its profile to `path` on a clean exit."""
    return ("-m", "cProfile", "-o", str(path), *CLI)


@dataclass
class ProcessGroup:
    """Child processes started by this launcher, each in its own process group, ended by pid (SIGTERM, then
    SIGKILL) whatever happens. `ok_exits`: the exit codes `failed()` does not report. `own_sessions`: each child
    leads its own session and process group, signalled as a whole (else it stays in ours, signalled by its pid)."""

    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ok_exits: tuple[int, ...] = NOT_FAILED
    own_sessions: bool = True
    _sigterm: Any = field(default=None, init=False, repr=False)  # the SIGTERM handler before the first start
    _stopped: set[str] = field(default_factory=set, init=False, repr=False)  # children running when stop_all came

    # ---- start -------------------------------------------------------------------------------------------------
    def start(
        self, name: str, argv: Sequence[str], *, entry: Sequence[str] = CLI, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen:
        """`python ENTRY ARGV` as `name`, logging to `LOG_DIR/NAME.log` (truncated); `env` adds to the environment."""
        self._trap_sigterm()
        with open(self.log_dir / f"{name}.log", "w") as out:  # the child holds its own copy
            proc = subprocess.Popen(
                [sys.executable, *entry, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **BASE_ENV, PARENT_ENV: str(os.getpid()), **(env or {})},
                start_new_session=self.own_sessions,
            )
        self.procs[name] = proc
        return proc

    # ---- stop --------------------------------------------------------------------------------------------------
    def kill(self, *names: str) -> None:
        """The crash: SIGKILL to each node and everything it started (its DHT process, its p2pd), no goodbye, all at
        once; then each is reaped (bounded)."""
        for name in names:
            self._signal(self.procs[name], signal.SIGKILL)
        for name in names:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.procs[name].wait(timeout=REAP_TIMEOUT_S)

    def kill_all(self) -> None:
        self.kill(*self.procs)

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM each child's process group (its DHT and p2pd children are in it, also once orphaned by a crash),
        SIGKILL whatever is left after `grace` seconds, reap every child, and SIGKILL each group once more for
        what outlived its leader."""
        self._stopped.update(name for name, proc in self.procs.items() if proc.poll() is None)
        for proc in self.procs.values():
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            self._signal(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=REAP_TIMEOUT_S)
        for proc in self.procs.values():  # leftovers of a group (p2pd) after its leader exited
            if self.own_sessions:
                self._signal(proc, signal.SIGKILL)
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None

    def _trap_sigterm(self) -> None:
        """SIGTERM to the launcher stops everything as Ctrl-C does: it raises KeyboardInterrupt in the main thread,
        so the caller's `finally: group.stop_all()` runs (SIGTERM's default would end the launcher alone and leave
        every node running). Only where the handler is still the default, from the main thread."""
        if self._sigterm is not None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._sigterm = signal.signal(signal.SIGTERM, _interrupt)

    def _signal(self, proc: subprocess.Popen, sig: int) -> None:
        if self.own_sessions:
            signal_group(proc, sig)
        elif proc.poll() is None:  # not yet reaped: its pid is still its own
            proc.send_signal(sig)

    # ---- state -------------------------------------------------------------------------------------------------
    def failed(self) -> list[str]:
        """Children that exited with an exit code outside `ok_exits`; a child this group stopped may also have ended
        as interrupted (INTERRUPTED_EXIT): that is the stop, not a failure."""
        return [
            n
            for n, p in self.procs.items()
            if (code := p.poll()) not in (None, *self.ok_exits)
            and not (n in self._stopped and code == INTERRUPTED_EXIT)
        ]

    def log_text(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pgids(self) -> set[int]:
        """The children's process groups (none without `own_sessions`: they share ours)."""
        return {p.pid for p in self.procs.values()} if self.own_sessions else set()

    def leftovers(self) -> list[int]:
        return leftovers(self.pgids())

    # ---- bounded waits -----------------------------------------------------------------------------------------
    def wait_until(
        self, what: str | Callable[[], str], ready: Callable[[], object], timeout: float, poll_s: float = 0.1
    ) -> None:
        """Poll `ready()` until it is true; UserError once a child failed or after `timeout` seconds (`what` names
        what is awaited in the error, or is called for that name then)."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.failed():
                name = what() if callable(what) else what
                raise UserError(f"{self.failed()} exited early while waiting for {name}; see {self.log_dir}")
            if time.monotonic() > deadline:
                name = what() if callable(what) else what
                raise UserError(f"{name} not within {timeout:.0f}s; see the logs in {self.log_dir}")
            time.sleep(poll_s)

    def wait_for_address(self, path: Path, timeout: float) -> list[str]:
        """The multiaddrs bootstrap published (its `--addr-file PATH`, the line it prints), once it has."""
        self.wait_until("the bootstrap's address", lambda: path.exists() and path.read_text().strip(), timeout)
        return path.read_text().split()

    def wait_for_line(self, names: Iterable[str], text: str, timeout: float, poll_s: float = 0.2) -> None:
        """Until the log of every child in `names` has `text` (e.g. relays printing "serving stage")."""
        waiting = list(names)

        def ready() -> bool:
            waiting[:] = [n for n in waiting if text not in self.log_text(n)]
            return not waiting

        self.wait_until(lambda: f"{text!r} in the logs of {waiting}", ready, timeout, poll_s)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group this launcher created for `proc` (its pid is the group id), by that pid."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(proc.pid, sig)


def leftovers(pgids: set[int]) -> list[int]:
    """Pids of anything still alive in the process groups `pgids` a launcher started (should be none)."""
    import psutil  # a test/benchmark dependency: only the harnesses that check for leftovers need it

    alive = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) in pgids and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
    return alive


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file another process is still writing."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written
    return rows
