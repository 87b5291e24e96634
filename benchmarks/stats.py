"""Means with 95 % intervals over repeated runs (Student's t: few repeats, unknown variance), for every benchmark.
The t quantiles are tabulated (scipy is not a dependency of gwtf).

    mean_ci([0.52, 0.55, 0.49])  ->  {"mean": 0.52, "low": 0.445, "high": 0.595, "n": 3}
"""

from __future__ import annotations

import math
import statistics

# Student's t, 97.5 % quantile (two-sided 95 %), by degrees of freedom 1..30 (any statistics table).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
        2.042)  # fmt: skip


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (beyond 30: 1.96 + 2.4 / df, within 0.1 %)."""
    if df < 1:
        raise ValueError(f"t975 needs df >= 1, got {df}")
    return T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and the two-sided t interval of the mean; with one value the interval is the value itself (and says so:
    n = 1). Non-finite values are left out (a run that did not reach its target has no time to target)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return {"mean": mean, "low": mean, "high": mean, "n": 1}
    half = t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(xs)}


def fmt(ci: dict[str, float], digits: int = 2) -> str:
    """`0.52 [0.45, 0.60] (n=3)`."""
    if not ci["n"]:
        return "n/a (no valid run)"
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}] (n={ci['n']})"
