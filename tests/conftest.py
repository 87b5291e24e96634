"""Shared fixtures: single-threaded torch, and reaping of every child process a test starts."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib

import psutil  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def _descendants() -> dict[int, psutil.Process]:
    """Child processes, except torch's shared-memory manager: torch starts it once per process and needs it for
    the rest of the session (reaping it breaks every later tensor sharing with "Broken pipe")."""
    return {p.pid: p for p in psutil.Process().children(recursive=True) if _name(p) != "torch_shm_manager"}


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.Error:
        return ""


def _reap(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


@pytest.fixture(autouse=True)
def reap_children(request):
    """Kill, by pid, every descendant process that appeared during the test (and only those).

    Tests that share processes across tests through a module-scoped fixture mark themselves `shared_procs`;
    those processes are then reaped by their fixture and, at the latest, by the session sweep below.
    """
    before = set(_descendants())
    yield
    if request.node.get_closest_marker("shared_procs") is None:
        _reap([p for pid, p in _descendants().items() if pid not in before])


@pytest.fixture(autouse=True, scope="session")
def reap_session_children():
    yield
    _reap(list(psutil.Process().children(recursive=True)))  # everything, torch's manager included
