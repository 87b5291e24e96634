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

A group made with `preload=True` forks each `-m gwtf...` child from one zygote process that has imported torch,
transformers' layers, hivemind and gwtf already (gwtf/launch/zygote.py): a node then starts in well under a second
and shares those imports' memory with the other nodes of this machine. Such a child is not this launcher's child but
the zygote's; `ForkedProcess` offers what the launcher uses of `subprocess.Popen` (pid, poll, wait, signals,
returncode), its exit reported by the zygote. If the zygote cannot start, the group says so in one line and starts
plain processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from gwtf.errors import UserError
from gwtf.lifecycle import PARENT_ENV

log = logging.getLogger(__name__)

CLI = ("-m", "gwtf.launch.cli")  # what a child runs unless `entry` says otherwise
BASE_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
# Exits that are not a failure: a clean one, and the signals a crash (injected or the harness's) or a stop sends.
NOT_FAILED = (0, -signal.SIGKILL, -signal.SIGTERM)
# gwtf.launch.cli's exit after KeyboardInterrupt: a node maps SIGTERM to it, so a child `stop_all` stopped exits so
INTERRUPTED_EXIT = 130
REAP_TIMEOUT_S = 10.0  # how long a SIGKILLed child may take to be reaped
ZYGOTE_START_S = 180.0  # how long the zygote may take to import everything (a loaded 2-core machine: ~30 s)


class Child(Protocol):
    """What the launcher uses of a child: `subprocess.Popen` and `ForkedProcess` both are one."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...


def profiled(path: Path) -> tuple[str, ...]:
    """An `entry` that runs the gwtf CLI under cProfile, writing its profile to `path` on a clean exit."""
    return ("-m", "cProfile", "-o", str(path), *CLI)


@dataclass
class ProcessGroup:
    """Child processes started by this launcher, each in its own process group, ended by pid (SIGTERM, then
    SIGKILL) whatever happens. `ok_exits`: the exit codes `failed()` does not report. `own_sessions`: each child
    leads its own session and process group, signalled as a whole (else it stays in ours, signalled by its pid).
    `preload`: children running a gwtf module are forked from a zygote (module doc)."""

    log_dir: Path
    procs: dict[str, Child] = field(default_factory=dict)
    ok_exits: tuple[int, ...] = NOT_FAILED
    own_sessions: bool = True
    preload: bool = False  # fork `-m gwtf...` children from a zygote that has imported everything (module doc)
    _zygote: Zygote | None = field(default=None, init=False, repr=False)
    _sigterm: Any = field(default=None, init=False, repr=False)  # the SIGTERM handler before the first start
    _stopped: set[str] = field(default_factory=set, init=False, repr=False)  # children running when stop_all came

    # ---- start -------------------------------------------------------------------------------------------------
    def start(
        self, name: str, argv: Sequence[str], *, entry: Sequence[str] = CLI, env: Mapping[str, str] | None = None
    ) -> Child:
        """`python ENTRY ARGV` as `name`, logging to `LOG_DIR/NAME.log` (truncated); `env` adds to the environment."""
        self._trap_sigterm()
        log_path = self.log_dir / f"{name}.log"
        zygote = self._zygote_for(entry)
        parent = zygote.pid if zygote is not None else os.getpid()  # the process whose end ends the child
        child_env = {**os.environ, **BASE_ENV, PARENT_ENV: str(parent), **(env or {})}
        if zygote is not None:
            log_path.write_text("")  # truncated here, appended to by the child
            proc: Child = zygote.spawn(entry[1], [*entry[2:], *argv], child_env, log_path, self.own_sessions)
        else:
            with open(log_path, "w") as out:  # the child holds its own copy
                proc = subprocess.Popen(
                    [sys.executable, *entry, *argv],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=child_env,
                    start_new_session=self.own_sessions,
                )
        self.procs[name] = proc
        return proc

    def _zygote_for(self, entry: Sequence[str]) -> Zygote | None:
        """The zygote that forks this entry (started on first use), or None: a plain process."""
        if not (self.preload and len(entry) >= 2 and entry[0] == "-m" and entry[1].startswith("gwtf.")):
            return None
        if self._zygote is None:
            try:
                self._zygote = Zygote(self.log_dir / "zygote.log", self.own_sessions)
            except UserError as exc:
                log.warning("%s; starting every node as a plain process instead", exc)
                self.preload = False
                return None
        return self._zygote

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
        if self._zygote is not None:  # after its children: it reports their exits
            self._zygote.close()
            self._zygote = None
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

    def _signal(self, proc: Child, sig: int) -> None:
        if self.own_sessions:
            signal_group(proc, sig)
        elif proc.poll() is None:  # not yet reaped: its pid is still its own
            proc.send_signal(sig)

    # ---- state -------------------------------------------------------------------------------------------------
    @property
    def zygote_pid(self) -> int | None:
        """The zygote this group's children were forked from (None: plain processes)."""
        return self._zygote.pid if self._zygote is not None else None

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
        if not self.own_sessions:
            return set()
        return {p.pid for p in self.procs.values()} | ({self._zygote.pid} if self._zygote else set())

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


def signal_group(proc: Child, sig: int) -> None:
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


class ForkedProcess:
    """A child the zygote forked: the part of `subprocess.Popen` the launcher uses. Its exit comes from the zygote
    (which reaps it); signals go to its pid while it has not been reported gone."""

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._ended = threading.Event()

    def ended(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Zygote:
    """The launcher's end of gwtf.launch.zygote: start it (bounded wait for its imports), ask it for children, read
    their exits. Its stderr goes to `log_path`. If it dies, its children end by themselves (their parent is gone);
    each is reported ended with exit code 1, an unknown failure, once its pid is gone."""

    def __init__(self, log_path: Path, own_session: bool) -> None:
        with open(log_path, "w") as err:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "gwtf.launch.zygote"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env={**os.environ, **BASE_ENV},
                start_new_session=own_session,
            )
        self.pid = self._proc.pid
        self._children: dict[int, ForkedProcess] = {}
        self._started: dict[int, int] = {}  # request id -> pid, until its requester takes it
        self._cond = threading.Condition()
        self._next_id = 0
        self._gone = False
        assert self._proc.stdout is not None and self._proc.stdin is not None
        self._stdin: IO[bytes] = self._proc.stdin
        first = _read_line_within(self._proc.stdout, ZYGOTE_START_S)
        if not first or "ready" not in first:
            why = (first or {}).get("refused") or f"no answer within {ZYGOTE_START_S:.0f} s (see {log_path})"
            self.close()
            raise UserError(f"the zygote that forks nodes did not start: {why}")
        threading.Thread(target=self._read, args=(self._proc.stdout,), name="gwtf-zygote", daemon=True).start()

    def spawn(self, module: str, argv: list[str], env: dict[str, str], log_path: Path, session: bool) -> Child:
        with self._cond:
            if self._gone:
                raise UserError(f"the zygote that forks nodes is gone (exit {self._proc.poll()}); see its log")
            request_id = self._next_id
            self._next_id += 1
            request = {"id": request_id, "module": module, "argv": argv, "env": env, "cwd": os.getcwd(),
                       "log": str(log_path), "session": session}  # fmt: skip
            self._stdin.write(json.dumps(request).encode() + b"\n")
            self._stdin.flush()
            if not self._cond.wait_for(lambda: request_id in self._started or self._gone, ZYGOTE_START_S):
                raise UserError(f"the zygote did not fork {module} within {ZYGOTE_START_S:.0f} s")
            if request_id not in self._started:
                raise UserError(f"the zygote that forks nodes died (exit {self._proc.poll()}); see its log")
            child = self._children[self._started.pop(request_id)]
            child.args = [module, *argv]
            return child

    def _read(self, stdout: IO[bytes]) -> None:
        for raw in stdout:
            message = json.loads(raw)
            with self._cond:
                if "started" in message:
                    pid = message["started"]
                    self._children[pid] = ForkedProcess(pid, [])  # its args: spawn's
                    self._started[message["id"]] = pid
                    self._cond.notify_all()
                elif "exit" in message and message["exit"] in self._children:
                    self._children[message["exit"]].ended(message["code"])
        with self._cond:
            self._gone = True
            self._cond.notify_all()
        # The zygote is gone: its children see their parent change and stop; report each once its pid is gone.
        deadline = time.monotonic() + REAP_TIMEOUT_S
        waiting = [c for c in self._children.values() if c.returncode is None]
        while waiting and time.monotonic() < deadline:
            for child in list(waiting):
                if not _pid_alive(child.pid):
                    child.ended(1)
                    waiting.remove(child)
            time.sleep(0.1)

    def close(self) -> None:
        """EOF to the zygote (it exits; a child still running then stops by itself), and reap it, bounded."""
        with contextlib.suppress(OSError, ValueError):
            self._proc.stdin.close()  # type: ignore[union-attr]
        try:
            self._proc.wait(timeout=REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=REAP_TIMEOUT_S)


def _read_line_within(stream: IO[bytes], timeout: float) -> dict[str, Any] | None:
    """One JSON line from `stream`, or None at EOF or after `timeout` seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        return None
    line = stream.readline()
    return json.loads(line) if line else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
