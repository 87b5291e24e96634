"""Nodes forked from one process that has already imported what a node runs on (torch, transformers' layers,
hivemind, gwtf): a zygote, as Android starts its apps. A launcher that starts several nodes on one machine (`gwtf
demo`, the benchmarks) pays those imports once instead of once per node, in CPU (seconds per node, which a crowd of
nodes starting together turns into minutes on a small machine) and in memory: a forked child shares the zygote's
pages until it writes them (`gc.freeze()` keeps the collector from writing to every imported object's header), so
the heap that imports build is counted once among the nodes, not per node (measured: benchmarks.throughput's PSS).

    python -m gwtf.launch.zygote          # started by gwtf.launch.processes.ProcessGroup(preload=True), not by hand

Protocol (JSON lines): the zygote writes {"ready": pid} once its imports are done, then reads requests {"id",
"module", "argv", "env", "cwd", "log", "session"} on stdin and answers each with {"started": pid, "id"}; the child
runs `python -m MODULE ARGV` (runpy, as `-m` does) with that environment, working directory and log file (stdout and
stderr), in its own session if asked. The zygote reaps its children and writes {"exit": pid, "code": c} (c as
subprocess reports it: negative for a signal). At EOF on stdin (the launcher is done, or gone) it exits; a child
then ends by itself, as a node does when its launcher is gone (its GWTF_PARENT_PID is the zygote's pid).

A child is a fresh node in every way that matters: its own pid, session and process group, environment, log and
signal handlers; Python's `random` reseeds at fork, numpy's global generator is reseeded here, torch's default
generator starts from the state a fresh interpreter has (the zygote never draws from it). The zygote forks only while
it runs one thread (checked at start: it refuses otherwise, and the launcher falls back to plain processes).
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import select
import signal
import sys
import threading
import warnings
from typing import Any

# What a node imports before it does anything (its command modules' imports pull in the rest of gwtf).
PRELOAD = (
    "torch",
    "transformers.models.llama.modeling_llama",
    "transformers.models.gpt2.modeling_gpt2",
    "hivemind",
    "gwtf.launch.cli",
    "gwtf.launch.join",
    "gwtf.launch.bootstrap",
    "gwtf.runtime.node",
    "gwtf.runtime.relay",
    "gwtf.runtime.datanode",
    "gwtf.dht",
    "gwtf.membership",
    "gwtf.transport",
    "gwtf.models.staged",
)
PRELOAD_ENV = "GWTF_PRELOAD_MODULES"  # comma-separated modules to preload instead of PRELOAD


def preload(modules: tuple[str, ...] | None = None) -> None:
    import importlib

    if modules is None:
        given = os.environ.get(PRELOAD_ENV)
        modules = tuple(m for m in given.split(",") if m) if given is not None else PRELOAD
    for name in modules:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # the imported objects move to a generation the collector never scans: their pages stay shared


def threads() -> int:
    """This process's threads as the kernel counts them (native ones included, which `threading` cannot see)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def serve(requests_fd: int, reply_fd: int) -> dict[str, Any] | None:
    """The zygote's loop: fork a child per request, report every child's exit; return at EOF (None) or, in a
    freshly forked child, its request."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so SIGCHLD wakes select through the wakeup fd
    pending = b""
    while True:
        ready, _, _ = select.select([requests_fd, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap(reply_fd)
        if requests_fd not in ready:
            continue
        data = os.read(requests_fd, 1 << 16)
        if not data:
            _reap(reply_fd)
            return None
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                for fd in (reply_fd, wake_r, wake_w):  # requests_fd is 0: `become` puts /dev/null there
                    os.close(fd)
                return request
            _reply(reply_fd, {"started": pid, "id": request["id"]})


def _reap(reply_fd: int) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _reply(reply_fd, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _reply(fd: int, message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data) :]


def become(request: dict[str, Any]) -> None:
    """In the forked child: take on the requested session, environment, directory, log and signal handlers, then
    run the module as `python -m` would (its SystemExit ends this process with its code)."""
    if request["session"]:
        os.setsid()
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    # fds 0, 1 and 2 stay open throughout (libuv, under hivemind, asserts it never closes one of them)
    for target, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["log"], os.O_WRONLY | os.O_APPEND)):
        fd = os.open(path, flags | os.O_CREAT, 0o644)
        os.dup2(fd, target)
        if fd > 2:
            os.close(fd)
    os.dup2(1, 2)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # a fresh interpreter seeds it from the OS; a fork would copy ours
    sys.argv = [request["module"], *request["argv"]]
    # runpy warns when the module it runs as __main__ was imported already (preloaded here): harmless, as when a
    # `python -m` module is also imported by name, and not the node's business to print
    warnings.filterwarnings("ignore", "'.*' found in sys.modules after import of package", RuntimeWarning)
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


def main() -> int:
    reply_fd = os.dup(1)  # the replies' channel; fd 1 itself now goes where stderr goes (the zygote's log)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the launcher, which stops the children itself
    try:
        preload()
    except Exception as exc:  # noqa: BLE001 - said in one line; the launcher falls back to plain processes
        _reply(reply_fd, {"refused": f"preloading failed: {type(exc).__name__}: {exc}"})
        return 1
    running = threads()
    if running != 1:  # a fork copies only the calling thread: locks held by others would never be released
        _reply(reply_fd, {"refused": f"{running} threads after preloading; forking is only safe with one"})
        return 1
    _reply(reply_fd, {"ready": os.getpid()})
    request = serve(0, reply_fd)
    if request is None:
        return 0
    become(request)  # only in a forked child
    return 0


if __name__ == "__main__":
    sys.exit(main())
