"""The churn harness's report lives in benchmarks/harness/report.py; this name stays importable for the code that
imports it from here (tests/test_install.py imports gwtf.benchmarks.report)."""

from gwtf.benchmarks.harness.report import (
    build_report,
    label,
    print_summary,
    ratios,
    run_report,
    time_to_target,
    to_full_throughput,
    write_plots,
)

__all__ = ["build_report", "label", "print_summary", "ratios", "run_report", "time_to_target", "to_full_throughput",
           "write_plots"]  # fmt: skip
