"""The README's results table, made from the crash-injection harness's JSON reports (not typed by hand):

    python -m gwtf.benchmarks.results_table docs/results/geo10.json docs/results/geo10-heavy.json ...

One row per report: gwtf's ratios against SWARM's routing, against DeepSpeed with checkpoint restart, and against
anything else compared (round-robin, other recovery strategies). Each ratio is the mean and 95 % t-interval over the
report's repeats (`--repeats N`; a single run gives its one value, n=1), computed here from every repeat's own ratios,
so a pair with an invalid run (did not finish, lost a microbatch, left a process behind) is left out and counted.
Below the table: the command that reproduces each row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gwtf.benchmarks.harness.report import RESTARTS_SCALED
from gwtf.benchmarks.stats import mean_ci

# (key in a ratio, what the table calls it): lower is better for times, higher for throughputs
FIGURES = (
    ("time_to_target", "time to target"),
    (RESTARTS_SCALED, "time to target, restarts scaled"),
    ("useful_throughput", "useful tokens/s"),
    ("raw_throughput", "raw tokens/s"),
    ("time_per_iteration", "s/iteration"),
)
SWARM, DEEPSPEED = "swarm", "deepspeed"
OLD_NAMES = {"useful_throughput": "throughput"}  # reports written before raw and useful tokens/s were told apart


def _reports(data: dict[str, Any]) -> list[dict[str, Any]]:
    return data.get("reports", [data])


def _against(b_label: str) -> str:
    """Which column a ratio a / b belongs in, from the compared run's label (`router=swarm`, `system=deepspeed`)."""
    values = dict(part.split("=", 1) for part in b_label.split(",") if "=" in part)
    if values.get("system") == DEEPSPEED:
        return DEEPSPEED
    if values.get("router") == SWARM:
        return SWARM
    return "other"


def pairs(data: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (a, b) pair: each figure's mean_ci over the repeats whose two runs are valid, and the invalid count."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for report in _reports(data):
        for r in report["ratios"]:
            pair = out.setdefault((r["a"], r["b"]), {"values": {k: [] for k, _ in FIGURES}, "invalid": 0})
            if r.get("invalid"):
                pair["invalid"] += 1
                continue
            for key, _ in FIGURES:
                value = r.get(key, r.get(OLD_NAMES.get(key, "")))
                if value is not None:
                    pair["values"][key].append(value)
    for pair in out.values():
        pair["ci"] = {k: mean_ci(v) for k, v in pair.pop("values").items() if v}
    return out


def _cell_text(pair: dict[str, Any], b: str, column: str) -> str:
    parts = []
    for key, name in FIGURES:
        if key == "raw_throughput" and column != DEEPSPEED:  # only a system that rolls back redoes steps
            continue
        ci = pair["ci"].get(key)
        if ci is None or not ci["n"]:
            continue
        interval = "" if ci["n"] == 1 else f" [{ci['low']:.2f}, {ci['high']:.2f}]"
        parts.append(f"{name} {ci['mean']:.2f}{interval}")
    n = max((ci["n"] for ci in pair["ci"].values()), default=0)
    text = ", ".join(parts) or "no valid pair"
    counts = f"n={n}" + (f", {pair['invalid']} invalid left out" if pair["invalid"] else "")
    return f"{'vs ' + b + ': ' if column == 'other' else ''}{text} ({counts})"


def row(path: Path) -> tuple[str, str]:
    """(the markdown row, the command that made it) of one report file: as the report recorded it, or, for a report
    that predates that, rebuilt from what it compared (writing to `path`)."""
    data = json.loads(path.read_text())
    reports = _reports(data)
    scenario = reports[0]["scenario"]
    cells: dict[str, list[str]] = {SWARM: [], DEEPSPEED: [], "other": []}
    for (_a, b), pair in pairs(data).items():
        column = _against(b)
        cells[column].append(_cell_text(pair, b, column))
    leftovers = sum(len(run.get("leftover_pids", [])) for rep in reports for run in rep["runs"])
    lost = sum(run["microbatches"]["lost"] for rep in reports for run in rep["runs"])
    seeds = [rep["settings"]["seed"] for rep in reports]
    commit = data.get("commit") or "not recorded"
    note = (f"{len(reports)} repeat{'s' * (len(reports) > 1)}, seeds {seeds}; lost {lost}, processes left "
            f"{leftovers}; commit {commit}")  # fmt: skip
    md = f"| {scenario} | {'<br>'.join(cells[SWARM])} | {'<br>'.join(cells[DEEPSPEED])} | " \
         f"{'<br>'.join(cells['other'])} | {note} |"  # fmt: skip
    return md, data.get("command") or f"{_command(scenario, reports)} --json {path}"


def _command(scenario: str, reports: list[dict[str, Any]]) -> str:
    """The churn command that makes such a report, from the labels it compared (for reports that predate `command`)."""
    labels = [run["label"] for run in reports[0]["runs"]]
    by_key: dict[str, list[str]] = {}
    for lab in labels:
        for part in lab.split(","):
            if "=" in part:
                key, value = part.split("=", 1)
                if value not in by_key.setdefault(key, []):
                    by_key[key].append(value)
    compares = " ".join(f"--compare {k}={','.join(v)}" for k, v in by_key.items() if len(v) > 1)
    repeats = f" --repeats {len(reports)}" if len(reports) > 1 else ""
    return f"python -m gwtf.benchmarks.churn --scenario benchmarks/scenarios/{scenario}.toml {compares}{repeats}"


def table(paths: list[Path]) -> str:
    lines = [
        "| scenario | vs SWARM routing | vs DeepSpeed + checkpoint restart | other | runs |",
        "|---|---|---|---|---|",
    ]
    commands = []
    for path in paths:
        md, command = row(path)
        lines.append(md)
        commands.append(f"- {path.name}: `{command}`")
    return "\n".join(lines + ["", *commands])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="JSON written by gwtf.benchmarks.churn --json")
    print(table(parser.parse_args().reports))


if __name__ == "__main__":
    main()
