"""A node's helper processes end with it, whatever ends it, SIGKILL included.

A node's DHT runs on a thread of its own process (gwtf.dht.ThreadDHT), and that thread starts the p2pd daemon. A node
that exits cleanly shuts p2pd down; a SIGKILL runs no cleanup, and p2pd would live on as an orphan, holding ports and
CPU. Linux's PR_SET_PDEATHSIG cannot be set for p2pd from here (asyncio starts it without a preexec hook), so
`end_with_this_process` starts a watchdog (`sh`, about 1 MB) that waits on a pipe only this process writes to: the
kernel closes it when this process ends, however it ends, and the watchdog then SIGKILLs p2pd. Any process forked
from a node (hivemind.DHT's, where a caller still makes one) runs a watchdog thread instead: once its parent is gone,
it SIGKILLs the processes it started itself and exits. The same watch, on the launcher named by `GWTF_PARENT_PID`
(set by gwtf.launch.processes), ends a node whose launcher (`gwtf demo`, the harness) was killed without stopping it.

`install()` is called by the node commands (`gwtf bootstrap`, `join`, `status`) before they start a DHT.

A node's threads carry their names to the operating system too (`name_os_thread`: `top -H`, `ps -L` and
/proc/PID/task/TID/comm show gwtf-compute, gwtf-dht, gwtf-beat, gwtf-watch), so their CPU can be told apart from
outside: benchmarks.throughput reports CPU per step by thread that way. The main thread keeps the process's name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PARENT_ENV = "GWTF_PARENT_PID"  # the launcher's pid: a node it started ends (SIGTERM to itself) once it is gone
WATCH_S = 0.5  # how often a watchdog looks at its parent pid

_installed = False
# A node's threads as the operating system names them (name_os_thread); its main thread keeps the process's name.
COMPUTE_THREAD, DHT_THREAD, BEAT_THREAD, WATCH_THREAD = "gwtf-compute", "gwtf-dht", "gwtf-beat", "gwtf-watch"
OS_NAME_BYTES = 15  # Linux keeps a thread's name to 15 bytes (TASK_COMM_LEN 16, with its terminating zero)


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` as the operating system sees it (Linux: its /proc/self/task/TID/comm, which
    a thread may write for itself; cut to 15 bytes). Best effort: elsewhere, or if /proc is not mounted, nothing."""
    with contextlib.suppress(OSError), open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
        f.write(name.encode()[:OS_NAME_BYTES].decode(errors="ignore"))


def os_named(name: str, target: Callable[[], object]) -> Callable[[], None]:
    """`target` as a thread's run function that first names its thread `name` for the operating system."""

    def run() -> None:
        name_os_thread(name)
        target()

    return run


def install() -> None:
    """From now on every process forked from this one ends when this one is gone, with what it started; and this
    process gets SIGTERM (its clean stop) once the launcher in GWTF_PARENT_PID is gone. Idempotent."""
    global _installed
    if _installed:
        return
    _installed = True
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_watch_from_forked_child)
    launcher = os.environ.pop(PARENT_ENV, None)  # for this process only: what it starts has its own parent
    if launcher and launcher.isdigit():
        watch_parent(int(launcher), lambda: os.kill(os.getpid(), signal.SIGTERM))
        # A launcher run from a shell without job control (a background `cmd &` in a script, CI) inherits SIGINT
        # ignored, and so would its nodes: Ctrl-C sent to a node's process group did nothing and the node ran on.
        # A node the launcher started takes SIGINT as Python does by default (KeyboardInterrupt: exit 130).
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def watch_parent(parent: int, on_gone: Callable[[], None]) -> threading.Thread:
    """A daemon thread that calls `on_gone()` once this process's parent is no longer `parent` (an orphan is
    re-parented to init or a subreaper, so its parent pid changes; a pid compared this way cannot be reused)."""

    def run() -> None:
        stop = threading.Event()
        while not stop.wait(WATCH_S):
            if os.getppid() != parent:
                on_gone()
                return

    thread = threading.Thread(target=os_named(WATCH_THREAD, run), name="gwtf-watch-parent", daemon=True)
    thread.start()
    return thread


def _watch_from_forked_child() -> None:
    """In a freshly forked child (hivemind's DHT process): end, with its own children, once the parent is gone. The
    node's SIGTERM handler (its clean stop) is the parent's: the child ends on SIGTERM as it would by default."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watch_parent(os.getppid(), _end_with_children)


def _end_with_children() -> None:
    for pid in children(os.getpid()):
        kill_quietly(pid)
    os._exit(1)


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid`, from /proc (Linux; elsewhere none are found)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it exited meanwhile
            continue
        fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(stat.parent.name))
    return found


# The watchdog: it reads one line from the pipe. "stop" (a clean stop, written by `release`) ends it quietly; the end
# of the pipe without it (this process is gone) makes it SIGKILL the daemon whose pid is its $0.
_WATCHDOG = 'read -r said; [ "$said" = stop ] || kill -KILL "$0" 2>/dev/null'


def end_with_this_process(pid: int) -> Callable[[], None]:
    """SIGKILL process `pid` (a daemon this process started: p2pd) once this process is gone, SIGKILL included (see
    the module docstring). Returns `release`, for a clean stop: the watchdog exits without killing and is reaped."""
    read_end, write_end = os.pipe()  # both non-inheritable: only this process holds the write end
    try:
        watchdog = subprocess.Popen(["sh", "-c", _WATCHDOG, str(pid)], stdin=read_end, start_new_session=True)
    finally:
        os.close(read_end)
    released = threading.Lock()

    def release() -> None:
        if not released.acquire(blocking=False):
            return
        with contextlib.suppress(OSError):
            os.write(write_end, b"stop\n")
        os.close(write_end)
        try:
            watchdog.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it cannot be stuck on anything but the pipe; end it
            watchdog.kill()
            watchdog.wait()

    return release


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
