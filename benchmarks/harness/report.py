"""The churn benchmark's report: JSON figures per run, ratios between compared runs, and PNG plots.

    report = build_report(scenario, results)      # harness.results.RunResult list -> JSON-able dict
    summary = repeat_summary([report, ...])        # `--repeats N`: every ratio's mean and 95 % t-interval
    write_plots(report, Path("docs/plots"))        # <scenario>-loss.png, -throughput.png, -live.png

Definitions (all times are wall seconds after the first iteration started):
- useful_tokens_per_s: the tokens of the steps that count (every data node's microbatches; a step DeepSpeed redid
  after a rollback counts once) over the run's wall time: what a user gets.
- raw_tokens_per_s: the tokens of every iteration run, redone ones too, over the run's wall time: what the machines
  processed. The two differ only for a system that rolls back. Per iteration (the plots): tokens of the iteration /
  its seconds.
- valid: the run finished every step, lost no microbatch and left no process behind; an invalid run is reported
  (with its reasons) and left out of every ratio.
- live relays per stage (the plots): the harness's own record of when each relay started serving and when it killed
  it, not the DHT records (a killed relay's record outlives it by its TTL).
- restarts_scaled: a DeepSpeed restart's fixed cost (from the restart's start to its first iteration's start:
  processes, DeepSpeed's init, the checkpoint load) is real wall time, which time_scale would otherwise turn into
  minutes of modelled time. `time_to_target_s_restarts_scaled` and `useful_tokens_per_s_restarts_scaled` count each
  such gap as gap / time_scale, like everything modelled; the waits for a machine (a modelled rejoin) stay.
- time to target: end of the first step whose training loss, averaged over the last `LOSS_WINDOW` steps, is at or
  below the scenario's target (the data node's training loss; the runtime does not log validation loss).
- time to full throughput after a crash: from the crash to the start of the first iteration ending after it that
  runs at >= `RECOVERED` x the median tokens/s of the `BEFORE_S` seconds before the crash, and with the median
  of it and the next `RECOVERY_WINDOW` - 1 iterations also there (0 when the crash slowed nothing).
- wasted compute (an upper bound): every re-routed or partial microbatch counted as redoing a whole route's
  forward and backward (3 x compute_ms per stage, the emulated compute; the debug preset's own compute is small).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from gwtf.benchmarks.stats import fmt, mean_ci

LOSS_WINDOW = 5
RECOVERY_WINDOW = 3
RECOVERED = 0.9
BEFORE_S = 30.0
COUNTS = ("started", "finished", "rerouted", "partial", "lost", "rolled_back")  # rolled_back: DeepSpeed redone


def label(variant: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in variant.items()) or "base"


def build_report(sc: Any, results: list[Any]) -> dict[str, Any]:
    runs = [run_report(sc, r) for r in results]
    return {
        "scenario": sc.name,
        "settings": {
            "preset": sc.preset,
            "stages": sc.stages,
            "relays": sc.relays,
            "data_nodes": sc.data_nodes,
            "steps": sc.steps,
            "target_loss": sc.target_loss,
            "time_scale": sc.time_scale,
            "compute_ms": sc.compute_ms,
            "churn": vars(sc.churn),
            "seed": sc.seed,
        },
        "runs": runs,
        "ratios": ratios(runs),
    }


def run_report(sc: Any, r: Any) -> dict[str, Any]:
    rows = r.rows
    all_rows = [rows, *r.other_rows]
    per_iter = [r.tokens_per_iteration / max(row["seconds"], 1e-9) for row in rows]
    elapsed = rows[-1]["t"] if rows else None
    totals = {k: sum(row.get(k, 0) for rs in all_rows for row in rs) for k in COUNTS}
    useful = sum(1 for row in rows if not row.get("rolled_back"))  # steps that count (a rollback redoes some)
    crashes = [e for e in r.events if "victims" in e]
    extra = {"redundancy": _redundancy(sc, r.redundancy, len(rows), totals)} if getattr(r, "redundancy", None) else {}
    timeline = getattr(r, "timeline", None)
    if timeline:
        extra["live_harness"] = live_from_timeline(timeline, sc.stages, elapsed or 0.0)
    invalid = invalid_reasons(r, totals, useful, sc.steps)
    restarts = restart_gaps(rows, r.events)
    if restarts:
        shrink = 1 - 1 / sc.time_scale
        scaled = time_to_target([{**row, "t": row["t"] - shrink * _gaps_before(restarts, row["t"])} for row in rows],
                                 sc.target_loss)  # fmt: skip
        end = elapsed - shrink * _gaps_before(restarts, elapsed) if elapsed else None
        extra["restarts_scaled"] = {
            "fixed_s": [g for _, g in restarts],
            "time_to_target_s_restarts_scaled": scaled,
            "useful_tokens_per_s_restarts_scaled": r.tokens_per_iteration * useful / end if end else None,
        }
    return {
        "variant": r.variant,
        "label": label(r.variant),
        "done": r.done,
        "valid": not invalid,
        "invalid_reasons": invalid,
        "steps": len(rows),
        "wall_s": round(r.wall_s, 2),
        "elapsed_s": elapsed,
        "failed_processes": r.failed,
        "leftover_pids": r.leftover_pids,
        "log_dir": r.log_dir,
        "time_per_iteration_s": _stats([row["seconds"] for row in rows]),
        "useful_tokens_per_s": r.tokens_per_iteration * useful / elapsed if elapsed else None,
        "raw_tokens_per_s": r.tokens_per_iteration * len(rows) / elapsed if elapsed else None,
        "microbatches": totals,
        "wasted_compute_s_upper_bound": (totals["rerouted"] + totals["partial"] + totals["rolled_back"])
        * sc.stages
        * 3
        * sc.compute_ms
        / 1e3,
        "time_to_target_s": time_to_target(rows, sc.target_loss),
        "final_loss": _smoothed(rows)[-1] if rows else None,
        "crashes": [{**e, "to_full_throughput_s": to_full_throughput(rows, per_iter, e["t"])} for e in crashes],
        "events": r.events,
        "series": {
            "t": [round(row["t"], 3) for row in rows],
            "step": [row["iteration"] for row in rows],
            "loss": [row["loss"] for row in rows],
            "tokens_per_s": [round(v, 1) for v in per_iter],
            "seconds": [row["seconds"] for row in rows],
            "live_per_stage": [row["live_per_stage"] for row in rows],
        },
        **extra,
    }


def restart_gaps(rows: list[dict], events: list[dict]) -> list[tuple[float, float]]:
    """(restart time, fixed cost) of each restart event: until its attempt's first iteration started."""
    gaps = []
    for ev in events:
        if ev.get("action") != "restart":
            continue
        first = next((row for row in rows if row.get("attempt") == ev["attempt"]), None)
        if first is not None:
            gaps.append((ev["t"], max(0.0, first["t"] - first["seconds"] - ev["t"])))
    return gaps


def _gaps_before(gaps: list[tuple[float, float]], t: float) -> float:
    return sum(g for start, g in gaps if start + g <= t)


def invalid_reasons(r: Any, totals: dict[str, int], useful_steps: int, steps: int) -> list[str]:
    """Why a run cannot stand in a comparison (none: it can)."""
    reasons = []
    if not r.done or useful_steps < steps:
        reasons.append(f"did not finish ({useful_steps} of {steps} steps)")
    if totals["lost"]:
        reasons.append(f"lost {totals['lost']} microbatch(es)")
    if r.leftover_pids:
        reasons.append(f"left {len(r.leftover_pids)} process(es) behind")
    return reasons


def live_from_timeline(timeline: list[dict], stages: int, end_s: float) -> dict[str, list]:
    """Live relays per stage as a step function of wall time, from the harness's own start/kill records."""
    counts = [0] * stages
    ts, per_stage = [], []
    for ev in sorted(timeline, key=lambda e: e["t"]):
        stage = ev.get("stage")
        if stage is None or not 1 <= stage <= stages:
            continue
        counts[stage - 1] += ev["delta"]
        if ts and ts[-1] == ev["t"]:
            per_stage[-1] = list(counts)
        else:
            ts.append(ev["t"])
            per_stage.append(list(counts))
    if ts and end_s > ts[-1]:
        ts.append(round(end_s, 3))
        per_stage.append(list(counts))
    return {"t": ts, "per_stage": per_stage}


def _redundancy(sc: Any, cost: dict[str, float], steps: int, totals: dict[str, int]) -> dict[str, Any]:
    """A recovery="redundant" run's extra work (all relays), per step, and against the compute the scenario emulates
    for the relays' regular work (forward + backward: 3 x compute_ms per stage and finished microbatch; the redundant
    seconds hold real compute too, which the debug preset keeps small)."""
    steps = max(steps, 1)
    regular_s = totals["finished"] * sc.stages * 3 * sc.compute_ms / 1e3
    return {
        **cost,
        "shadow_bytes_per_step": cost["shadow_bytes"] / steps,
        "redundant_forward_s_per_step": cost["redundant_forward_s"] / steps,
        "vs_regular_compute": cost["redundant_forward_s"] / regular_s if regular_s else None,
    }


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "max": max(values)}


def _smoothed(rows: list[dict]) -> list[float]:
    losses = [row["loss"] for row in rows]
    return [statistics.fmean(losses[max(0, i - LOSS_WINDOW + 1) : i + 1]) for i in range(len(losses))]


def time_to_target(rows: list[dict], target: float | None) -> float | None:
    if target is None:
        return None
    for row, loss in zip(rows, _smoothed(rows), strict=True):
        if loss <= target:
            return round(row["t"], 3)
    return None


def to_full_throughput(rows: list[dict], per_iter: list[float], t_crash: float) -> float | None:
    before = [v for row, v in zip(rows, per_iter, strict=True) if t_crash - BEFORE_S <= row["t"] < t_crash]
    if len(before) < RECOVERY_WINDOW:
        before = [v for row, v in zip(rows, per_iter, strict=True) if row["t"] < t_crash]
    if not before:
        return None
    threshold = RECOVERED * statistics.median(before)
    for i, row in enumerate(rows):
        window = per_iter[i : i + RECOVERY_WINDOW]
        if row["t"] <= t_crash or len(window) < RECOVERY_WINDOW:
            continue
        if window[0] >= threshold and statistics.median(window) >= threshold:  # one fast step is not recovery
            return round(max(0.0, row["t"] - row["seconds"] - t_crash), 3)
    return None


RATIOS = ("time_to_target", "useful_throughput", "raw_throughput", "time_per_iteration")
RESTARTS_SCALED = "time_to_target_restarts_scaled"  # only where DeepSpeed restarted (module docstring)
FIGURES = ("time_to_target_s", "useful_tokens_per_s", "raw_tokens_per_s")  # a run's, summarised over repeats


def ratios(runs: list[dict]) -> list[dict[str, Any]]:
    """The first run against each other one: a / b for time to target, useful and raw throughput and time per
    iteration. A pair with an invalid run gets no figures, only the reason."""
    out = []
    for b in runs[1:]:
        a = runs[0]
        pair: dict[str, Any] = {"a": a["label"], "b": b["label"]}
        invalid = [f"{r['label']}: {why}" for r in (a, b) for why in r.get("invalid_reasons", [])]
        if invalid:
            out.append({**pair, **dict.fromkeys(RATIOS), "invalid": invalid})
            continue
        tpi = (a["time_per_iteration_s"] or {}).get("mean"), (b["time_per_iteration_s"] or {}).get("mean")
        out.append(
            {
                **pair,
                "time_to_target": _ratio(a["time_to_target_s"], b["time_to_target_s"]),
                "useful_throughput": _ratio(a["useful_tokens_per_s"], b["useful_tokens_per_s"]),
                "raw_throughput": _ratio(a["raw_tokens_per_s"], b["raw_tokens_per_s"]),
                "time_per_iteration": _ratio(*tpi),
            }
        )
        if "restarts_scaled" in a or "restarts_scaled" in b:
            ttt = [r.get("restarts_scaled", {}).get("time_to_target_s_restarts_scaled", r["time_to_target_s"])
                   for r in (a, b)]  # fmt: skip
            out[-1][RESTARTS_SCALED] = _ratio(*ttt)
    return out


def repeat_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """`--repeats N`: each ratio's mean and 95 % t-interval over the repeats whose two runs are valid, and each
    variant's figures the same way; the invalid runs listed with their reasons."""
    pairs: dict[tuple[str, str], dict[str, list[float]]] = {}
    for rep in reports:
        for r in rep["ratios"]:
            figures = pairs.setdefault((r["a"], r["b"]), {k: [] for k in (*RATIOS, RESTARTS_SCALED)})
            for k in (*RATIOS, RESTARTS_SCALED):
                if r.get(k) is not None:
                    figures[k].append(r[k])
    per_variant: dict[str, dict[str, list[float]]] = {}
    for rep in reports:
        for run in rep["runs"]:
            if run["valid"]:
                figs = per_variant.setdefault(run["label"], {k: [] for k in (*FIGURES, "s_per_iteration")})
                for k in FIGURES:
                    if run[k] is not None:
                        figs[k].append(run[k])
                if run["time_per_iteration_s"]:
                    figs["s_per_iteration"].append(run["time_per_iteration_s"]["mean"])
    return {
        "repeats": len(reports),
        "seeds": [rep["settings"]["seed"] for rep in reports],
        "ratios": [
            {"a": a, "b": b, **{k: mean_ci(v) for k, v in figs.items() if v or k != RESTARTS_SCALED}}
            for (a, b), figs in pairs.items()
        ],  # fmt: skip
        "variants": {name: {k: mean_ci(v) for k, v in figs.items()} for name, figs in per_variant.items()},
        "invalid_runs": [
            {"seed": rep["settings"]["seed"], "label": run["label"], "reasons": run["invalid_reasons"]}
            for rep in reports
            for run in rep["runs"]
            if not run["valid"]
        ],  # fmt: skip
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# ---------------------------------------------------------------------------------------------------------------
# text and plots


def print_summary(report: dict[str, Any]) -> None:
    target = report["settings"]["target_loss"]
    print(f"\n{report['scenario']}: target loss {target}")
    print(f"{'run':28s} {'steps':>5s} {'s/iter':>7s} {'useful/s':>8s} {'raw tok/s':>9s} {'to target':>9s} "
          f"{'final':>6s} {'crashes':>7s} {'rerouted':>8s} {'lost':>4s} {'to full tput (s)':>18s}")  # fmt: skip
    for run in report["runs"]:
        tpi = (run["time_per_iteration_s"] or {}).get("mean")
        recov = [c["to_full_throughput_s"] for c in run["crashes"]]
        print(f"{run['label']:28s} {run['steps']:5d} {_fmt(tpi, 7, 3)} {_fmt(run['useful_tokens_per_s'], 8, 0)} "
              f"{_fmt(run['raw_tokens_per_s'], 9, 0)} "
              f"{_fmt(run['time_to_target_s'], 9, 1)} {_fmt(run['final_loss'], 6, 3)} {len(run['crashes']):7d} "
              f"{run['microbatches']['rerouted']:8d} {run['microbatches']['lost']:4d} "
              f"{' '.join('-' if v is None else f'{v:.0f}' for v in recov):>18s}"
              f"{'' if run['valid'] else '  INVALID: ' + '; '.join(run['invalid_reasons'])}")  # fmt: skip
    for r in report["ratios"]:
        if r.get("invalid"):
            print(f"{r['a']} / {r['b']}: no ratio ({'; '.join(r['invalid'])})")
            continue
        print(f"{r['a']} / {r['b']}: time to target {r['time_to_target']}, useful throughput "
              f"{r['useful_throughput']}, raw throughput {r['raw_throughput']}, time per iteration "
              f"{r['time_per_iteration']}")  # fmt: skip
    for run in report["runs"]:
        red = run.get("redundancy")
        if red:
            share = red["vs_regular_compute"]
            print(f"{run['label']}: extra work of redundant computation: shadow state fetched "
                  f"{red['shadow_bytes'] / 1e6:.1f} MB ({red['shadow_bytes_per_step'] / 1e6:.2f} MB/step), "
                  f"{int(red['redundant_forwards'])} redundant forwards in {red['redundant_forward_s']:.1f} s "
                  f"({red['redundant_forward_s_per_step']:.2f} s/step"
                  f"{'' if share is None else f', {share:.2f} x the emulated regular compute'})")  # fmt: skip


def print_repeats(summary: dict[str, Any]) -> None:
    print(f"\nover {summary['repeats']} repeats (seeds {summary['seeds']}); mean [95 % t-interval] (n valid pairs)")
    for r in summary["ratios"]:
        print(f"{r['a']} / {r['b']}: " + ", ".join(f"{k} {fmt(r[k], 3)}" for k in (*RATIOS, RESTARTS_SCALED) if k in r))
    for run in summary["invalid_runs"]:
        print(f"invalid (left out): seed {run['seed']} {run['label']}: {'; '.join(run['reasons'])}")


def _fmt(v: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}s}" if v is None else f"{v:{width}.{digits}f}"


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    name = report["scenario"]
    return [
        _plot_loss(plt, report, out / f"{name}-loss.png"),
        _plot_throughput(plt, report, out / f"{name}-throughput.png"),
        _plot_live(plt, report, out / f"{name}-live.png"),
    ]


def _mark_crashes(ax: Any, run: dict, color: str) -> None:
    for i, c in enumerate(run["crashes"]):
        ax.axvline(c["t"], color=color, linestyle=":", linewidth=1, label=f"{run['label']} crash" if i == 0 else None)


def _plot_loss(plt: Any, report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=80)
    for i, run in enumerate(report["runs"]):
        color = f"C{i}"
        ax.plot(run["series"]["t"], run["series"]["loss"], color=color, linewidth=1.2, label=run["label"])
        _mark_crashes(ax, run, color)
    if report["settings"]["target_loss"] is not None:
        ax.axhline(report["settings"]["target_loss"], color="grey", linewidth=0.8, label="target loss")
    ax.set(xlabel="wall clock (s)", ylabel="training loss", title=f"{report['scenario']}: loss, crashes dotted")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _plot_throughput(plt: Any, report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=80)
    for i, run in enumerate(report["runs"]):
        color = f"C{i}"
        tps = run["series"]["tokens_per_s"]
        smooth = [statistics.fmean(tps[max(0, j - 4) : j + 1]) for j in range(len(tps))]
        ax.plot(run["series"]["t"], tps, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(run["series"]["t"], smooth, color=color, linewidth=1.4, label=f"{run['label']} (5-step mean)")
        _mark_crashes(ax, run, color)
    ax.set(xlabel="wall clock (s)", ylabel="tokens/s", title=f"{report['scenario']}: throughput")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _plot_live(plt: Any, report: dict, path: Path) -> Path:
    runs = report["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(7, 1.2 + 1.8 * len(runs)), dpi=80, sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        # the harness's own kill/serve times; a run without them (DeepSpeed) plots its ranks' own count
        harness = run.get("live_harness")
        t, live = (
            (harness["t"], harness["per_stage"]) if harness else (run["series"]["t"], run["series"]["live_per_stage"])
        )
        for k in range(report["settings"]["stages"]):
            ax.step(t, [row[k] for row in live], where="post", label=f"stage {k + 1}")
        _mark_crashes(ax, run, "black")
        ax.set(ylabel="live relays", title=run["label"] + ("" if harness else " (its own count)"))
        ax.legend(fontsize=6, loc="lower left", ncol=4)
    axes[-1, 0].set_xlabel("wall clock (s)")
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
