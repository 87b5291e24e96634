"""Metrics as JSON lines: one object per event, each stamped with the wall time, easy to tail, grep and plot.

with MetricsWriter("run/metrics.jsonl") as m:
    m.write(event="step", step=3, loss=4.2)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any


class MetricsWriter:
    """Appends JSON lines to `path`; with path None it drops everything (so callers need no `if`)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self._fh: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, **fields: Any) -> None:
        """One line with `time` (unix seconds) and the fields; NaN/inf become null to keep the JSON valid."""
        if self._fh is None:
            return
        record = {"time": round(time.time(), 6), **{k: _jsonable(v) for k, v in fields.items()}}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()  # a crashed run keeps every line written so far

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensors and numpy scalars
        return _jsonable(value.item())
    return value
