"""TensorBoard scalars of a run, one step per iteration (`--tensorboard DIR`, then `tensorboard --logdir DIR`).

A data node logs what it reports each iteration (the same fields as its metrics' `iteration` line): loss, tokens/s,
microbatches re-routed, partial and lost, live replicas per stage; the validation loss where a run measures one;
and the routing's gap to the optimum on the iteration's view and plan (gwtf.telemetry.routing_gap), which a worker
thread computes so that no iteration waits for it.

    board = ScalarBoard(check_logdir("runs/tb/data-0"))
    board.iteration(row)                                   # {"iteration": 3, "loss": 4.2, "tokens_per_s": ...}
    board.in_background(3, lambda: routing_gap(view, plan, demands), prefix="routing/")
    board.close()                                          # waits for the one computation in flight, flushes
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gwtf.errors import UserError

log = logging.getLogger(__name__)

# an iteration line's field -> its scalar's tag
ITERATION_TAGS = {
    "loss": "loss/train",
    "val_loss": "loss/val",
    "tokens_per_s": "throughput/tokens_per_s",
    "seconds": "throughput/iteration_s",
    "rerouted": "microbatches/rerouted",
    "partial": "microbatches/partial",
    "lost": "microbatches/lost",
}
LIVE_TAG = "swarm/live_replicas/stage_{}"  # one per relay stage, from the line's `live_per_stage`


def check_logdir(path: str | Path, flag: str = "--tensorboard") -> Path:
    """`path`, created if need be, or a one-line UserError if this process cannot write event files there."""
    logdir = Path(path)
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=logdir, prefix=".gwtf-write-check-"):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    return logdir


class ScalarBoard:
    """Scalars in TensorBoard event files under `logdir` (one run); with logdir None it drops everything, like
    gwtf.metrics.MetricsWriter, so callers need no `if`."""

    def __init__(self, logdir: str | Path | None):
        self.logdir = Path(logdir) if logdir is not None else None
        self._writer: Any = None
        self._lock = threading.Lock()  # the writer is fed from the caller's thread and the worker's
        self._worker: ThreadPoolExecutor | None = None
        self._in_flight: Future | None = None
        self.skipped = 0  # background computations not started because the previous one was still running
        if self.logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.logdir), flush_secs=5)
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorboard")

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def add(self, step: int, values: Mapping[str, float | int | None], walltime: float | None = None) -> None:
        """One scalar per tag at `step`; None values are left out."""
        if self._writer is None:
            return
        with self._lock:
            for tag, value in values.items():
                if value is not None:
                    self._writer.add_scalar(tag, float(value), global_step=step, walltime=walltime)

    def iteration(self, row: Mapping[str, Any], walltime: float | None = None) -> None:
        """A metrics `iteration` line (gwtf.runtime.flights.IterationReport's figures and `live_per_stage`)."""
        values: dict[str, float | int | None] = {tag: row.get(field) for field, tag in ITERATION_TAGS.items()}
        for stage, live in enumerate(row.get("live_per_stage") or [], start=1):
            values[LIVE_TAG.format(stage)] = live
        self.add(int(row["iteration"]), values, walltime)
        self.flush()

    def in_background(self, step: int, compute: Callable[[], Mapping[str, float]], prefix: str = "") -> bool:
        """Log `compute()`'s figures at `step` (tags prefixed) once a worker thread has computed them; False (and
        nothing done) while the previous computation still runs, so a slow one never piles up behind iterations."""
        if self._worker is None:
            return False
        if self._in_flight is not None and not self._in_flight.done():
            self.skipped += 1
            return False
        self._in_flight = self._worker.submit(self._compute_and_add, step, compute, prefix)
        return True

    def _compute_and_add(self, step: int, compute: Callable[[], Mapping[str, float]], prefix: str) -> None:
        try:
            figures = compute()
        except Exception as exc:  # a figure that cannot be computed this step is missing from the board, not fatal
            log.warning(
                "tensorboard: step %d: no %s figures (%s: %s)", step, prefix or "background", type(exc).__name__, exc
            )
            return
        self.add(step, {f"{prefix}{k}": v for k, v in figures.items() if _finite(v)})
        self.flush()

    def drain(self) -> None:
        """Wait until the computation in flight, if any, has logged its figures."""
        if self._in_flight is not None:
            self._in_flight.result()

    def flush(self) -> None:
        if self._writer is not None:
            with self._lock:
                self._writer.flush()

    def close(self) -> None:
        """Wait for the computation in flight, write everything out, close the files."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self._writer is not None:
            with self._lock:
                self._writer.close()
            self._writer = None

    def __enter__(self) -> ScalarBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
