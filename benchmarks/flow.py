"""GWTF routing against the ortools optimum and the SWARM / round-robin baselines, in the simulator.

    python -m gwtf.benchmarks.flow --nodes 1000 --stages 10 --seeds 5 --json flow_1000.json

Per seed: a random topology (gwtf.routing.simulator), the optimum (gwtf.routing.optimum), the GWTF agents run
for --rounds rounds, then 20 % of the relays crash and they run --reconverge-rounds more; the baselines plan the
same topology. Ratios are against the optimum computed in the same run. Converged = the first round from which
throughput stays at its final value and total cost within 1 % of its final value.
iteration_time_vs_swarm: simulated time of --iterations iterations (same microbatches, same churn draws) under
--churn-per-hour (each relay leaves with probability 1 - (1 - rate) ** (t_iter / 3600) per iteration; a newcomer
takes its place), GWTF over SWARM (below 1 = GWTF faster). SWARM is SWARM's own balancer
(gwtf.routing.baselines.SwarmRouter): it learns each relay from the forward calls it times in the simulation
(network + queue + compute), starting from nothing, as SWARM does; `_steady` compares the second half of the
iterations only, once it has measured the swarm. `_vs_swarm_compute`: against the earlier compute-time-only variant.
Each figure comes with the mean and a 95 % t-interval over the seeds. --oracle-timing adds the optimum's plan's.

At N = 10,000 (a run takes tens of minutes per seed on one core, nearly all of it in the agents' rounds):
    python -m gwtf.benchmarks.flow --nodes 10000 --iterations 8 --timing-only --first-seed 0 --json s0.json &
    python -m gwtf.benchmarks.flow --nodes 10000 --iterations 8 --timing-only --first-seed 1 --json s1.json
    python -m gwtf.benchmarks.flow --merge s0.json s1.json --json flow_10000.json
--timing-only leaves out the optimum (its integer program) and the crash/reconvergence figures; --first-seed lets
seeds run as separate processes and --merge summarizes their outputs (same settings, distinct seeds).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import time

from gwtf.benchmarks.stats import fmt, mean_ci
from gwtf.errors import UserError
from gwtf.routing.agent import AgentConfig
from gwtf.routing.base import Plan, Router, SwarmView
from gwtf.routing.baselines import RoundRobinRouter, SwarmComputeRouter, SwarmRouter
from gwtf.routing.gwtf_router import GWTFRouter
from gwtf.routing.optimum import OracleRouter, solve_optimum, total_cost, worst_path
from gwtf.routing.simulator import TopologyConfig, churn, crash, iteration_time, random_topology

CHURN_PER_HOUR = 0.10
CRASH_FRACTION = 0.20


def converged_at(trace: list[tuple[int, float]]) -> int:
    final_n, final_cost = trace[-1]
    for r in range(len(trace)):
        if all(n == final_n and abs(c - final_cost) <= 0.01 * max(final_cost, 1e-9) for n, c in trace[r:]):
            return r + 1
    return len(trace)


def count(plan: Plan) -> int:
    return sum(len(p) for p in plan.values())


def one_seed(cfg: TopologyConfig, seed: int, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    out = {"seed": seed} if args.timing_only else _against_optimum(cfg, seed, args)
    out.update(_churn_timing(cfg, seed, args))
    out["wall_s"] = time.perf_counter() - t0
    return out


def _against_optimum(cfg: TopologyConfig, seed: int, args: argparse.Namespace) -> dict:
    """GWTF's plan and the baselines' against the optimum of the same topology, and GWTF's reconvergence after a
    crash of CRASH_FRACTION of the relays."""
    view, demands = random_topology(cfg, seed)
    t0 = time.perf_counter()
    opt = solve_optimum(view, demands)
    t_opt = time.perf_counter() - t0
    router = GWTFRouter(seed, rounds=args.rounds, reconverge_rounds=args.reconverge_rounds, cfg=_agent_cfg(args))
    t0 = time.perf_counter()
    plan = router.plan(view, demands)
    t_gwtf = time.perf_counter() - t0
    run = router.run
    assert run is not None
    msgs = run.messages() / max(1, len(run.agents)) / args.rounds
    trace = router.trace
    out = {
        "seed": seed,
        "optimal_throughput": opt.throughput,
        "lp_throughput": opt.lp_throughput,
        "gwtf_throughput": count(plan),
        "optimality_ratio": count(plan) / max(opt.throughput, 1),
        "worst_path_cost_ratio": worst_path(view, plan) / opt.worst_path if opt.worst_path else 1.0,
        "worst_path_vs_lower_bound": worst_path(view, plan) / max(opt.worst_path_lower_bound, 1e-9),
        "total_cost_ratio": total_cost(view, plan) / max(opt.total_cost, 1e-9),
        "rounds_to_converge": converged_at(trace),
        "messages_per_node_per_round": msgs,
        "sim_rounds_per_s": args.rounds / t_gwtf,
        "optimum_s": t_opt,
    }
    for router_cls, key in ((SwarmRouter, "swarm"), (RoundRobinRouter, "round_robin")):
        base = router_cls(seed).plan(view, demands)
        out[f"{key}_ratio"] = count(base) / max(opt.throughput, 1)
        out[f"{key}_cost_ratio"] = total_cost(view, base) / max(opt.total_cost, 1e-9)
        out[f"{key}_worst_path_ratio"] = worst_path(view, base) / opt.worst_path if opt.worst_path else 1.0
    out.update(_reconverge(view, demands, router, seed))
    return out


def _reconverge(view: SwarmView, demands: dict[str, int], router: GWTFRouter, seed: int) -> dict:
    crashed = crash(view, CRASH_FRACTION, random.Random(seed + 1))
    plan = router.plan(crashed, demands)
    opt = solve_optimum(crashed, demands)
    return {
        "rounds_to_reconverge": converged_at(router.trace),
        "reconverged_ratio": count(plan) / max(opt.throughput, 1),
    }


def _churn_timing(cfg: TopologyConfig, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Same topology, same churn draws, same microbatches: GWTF's simulated time over SWARM's (and, with
    --oracle-timing, the optimum's plan's: what the flow objective itself gives)."""
    gwtf = GWTFRouter(seed, args.rounds, args.reconverge_rounds, cfg=_agent_cfg(args))
    routers: list[tuple[str, Router]] = [("gwtf", gwtf), ("swarm", SwarmRouter(seed)),
                                         ("swarm_compute", SwarmComputeRouter(seed))]  # fmt: skip
    if args.oracle_timing:
        routers.append(("oracle", OracleRouter(seed)))
    steps, churned = {}, 0
    for name, router in routers:
        steps[name], churned = _timed_iterations(cfg, seed, router, args)
    half = args.iterations // 2
    out: dict[str, float] = {"churned_relays": churned}  # the last router's count (the draws differ with t_iter)
    for name, times in steps.items():
        out[f"{name}_iteration_s"] = sum(times) / len(times)
    for name in ("gwtf", "oracle", "swarm_compute"):
        if name not in steps:
            continue
        key = "iteration_time" if name == "gwtf" else f"{name}_iteration_time"
        out[f"{key}_vs_swarm"] = sum(steps[name]) / sum(steps["swarm"])
        out[f"{key}_vs_swarm_steady"] = sum(steps[name][half:]) / sum(steps["swarm"][half:])
    out["iteration_time_vs_swarm_compute"] = sum(steps["gwtf"]) / sum(steps["swarm_compute"])
    return out


def _timed_iterations(
    cfg: TopologyConfig, seed: int, router: Router, args: argparse.Namespace
) -> tuple[list[float], int]:
    """Simulated seconds of each iteration, and how many relays churned; the router is told of every forward call
    it could have timed."""
    view, demands = random_topology(cfg, seed)
    rng = random.Random(seed + 2)  # the same churn draws for every router
    clock = [0.0]
    if isinstance(router, SwarmRouter):
        router.clock = lambda: clock[0]  # bans expire in simulated time
    steps, churned = [], 0
    for it in range(args.iterations):
        step = iteration_time(view, router.plan(view, demands), demands, observe=router.observe)
        steps.append(step)
        if args.progress:  # long runs (N = 10,000): each figure as it comes, in case the run is cut short
            print(f"# seed {seed} {router.name} iteration {it}: {step:.4f} s", file=sys.stderr, flush=True)
        if math.isinf(step):
            break
        clock[0] += step
        p_leave = 1 - (1 - args.churn_per_hour) ** (step / 3600)
        before = set(view.relays)
        view = churn(view, p_leave, rng, tag=f"j{it}_")
        churned += len(before - set(view.relays))
    return steps, churned


def _agent_cfg(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig(exchange=args.exchange, takeover=args.takeover, moves=args.moves)


OPTIMUM_FIGURES = {  # summary key -> (per-seed key, how seeds combine); absent under --timing-only
    "optimality_ratio_mean": ("optimality_ratio", "mean"),
    "optimality_ratio_min": ("optimality_ratio", "min"),
    "worst_path_cost_ratio_mean": ("worst_path_cost_ratio", "mean"),
    "worst_path_vs_lower_bound_mean": ("worst_path_vs_lower_bound", "mean"),
    "total_cost_ratio_mean": ("total_cost_ratio", "mean"),
    "rounds_to_converge_p95": ("rounds_to_converge", "p95"),
    "rounds_to_reconverge_p95": ("rounds_to_reconverge", "p95"),
    "reconverged_ratio_mean": ("reconverged_ratio", "mean"),
    "messages_per_node_per_round_mean": ("messages_per_node_per_round", "mean"),
    "swarm_ratio_mean": ("swarm_ratio", "mean"),
    "swarm_cost_ratio_mean": ("swarm_cost_ratio", "mean"),
    "round_robin_ratio_mean": ("round_robin_ratio", "mean"),
    "round_robin_cost_ratio_mean": ("round_robin_cost_ratio", "mean"),
    "sim_rounds_per_s": ("sim_rounds_per_s", "mean"),
    "optimum_s_mean": ("optimum_s", "mean"),
}


def summarize(rows: list[dict], args: argparse.Namespace) -> dict:
    def p95(values: list[float]) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]

    combine = {"mean": statistics.fmean, "min": min, "p95": p95}
    timing = [k for k in rows[0] if "vs_swarm" in k or k.endswith("_iteration_s")]
    optimum = {
        key: combine[how]([r[field] for r in rows])
        for key, (field, how) in OPTIMUM_FIGURES.items()
        if all(field in r for r in rows)
    }
    return {
        "nodes": args.nodes,
        "stages": args.stages,
        "seeds": len(rows),
        "exchange": args.exchange,
        "takeover": args.takeover,
        "moves": getattr(args, "moves", 0),
        "timing_only": bool(args.timing_only),
        **optimum,
        "iterations": args.iterations,
        "churn_per_hour": args.churn_per_hour,
        **{k: statistics.fmean(r[k] for r in rows) for k in timing},
        "intervals": {k: mean_ci([r[k] for r in rows]) for k in timing},
        "wall_s_per_seed_mean": statistics.fmean(r.get("wall_s", math.nan) for r in rows),
        "runs": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--stages", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--reconverge-rounds", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--churn-per-hour", type=float, default=CHURN_PER_HOUR, help="relay churn (0.10 = 10 %%/h)")
    parser.add_argument("--exchange", action="store_true", help="agents also exchange next hops across relays")
    parser.add_argument("--takeover", action="store_true", help="relays hand costly microbatches to peers with room")
    parser.add_argument("--moves", type=int, default=0, help="cheaper next hops each agent tries per round (moves.py)")
    parser.add_argument(
        "--oracle-timing", action="store_true", help="also time the optimum's plan (oracle_iteration_time_vs_swarm)"
    )
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="only the iteration-time comparison (no optimum, whose integer program dominates at N = 10,000)",
    )
    parser.add_argument("--progress", action="store_true", help="print each iteration's time to stderr")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument(
        "--merge", nargs="+", default=None, metavar="JSON", help="summarize the runs of these outputs (no new run)"
    )
    parser.add_argument("--json", default=None, help="write the summary here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.merge:
        rows = _merged(args)
    else:
        cfg = TopologyConfig(nodes=args.nodes, stages=args.stages)
        rows = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            rows.append(one_seed(cfg, seed, args))
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    summary = summarize(rows, args)
    for key, value in summary.items():
        if key not in ("runs", "intervals"):
            print(f"{key:34s} {value:.4g}" if isinstance(value, float) else f"{key:34s} {value}")
    for key, ci in summary["intervals"].items():
        print(f"{key:34s} {fmt(ci, 3)}  (mean [95 % t-interval] over seeds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


def _merged(args: argparse.Namespace) -> list[dict]:
    """The runs of earlier outputs (seeds run as separate processes), which must share their settings; `args` takes
    them on."""
    rows, settings = [], None
    for path in args.merge:
        with open(path) as f:
            summary = json.load(f)
        mine = {k: summary.get(k, 0 if k == "moves" else None) for k in MERGE_SETTINGS}  # moves: added later
        if settings is not None and mine != settings:
            raise UserError(f"--merge: {path} was run with {mine}, the first with {settings}")
        settings = mine
        rows.extend(summary["runs"])
    assert settings is not None
    for key, value in settings.items():
        setattr(args, key, value)
    seeds = [r["seed"] for r in rows]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--merge: seeds {sorted(seeds)} repeat")
    return rows


MERGE_SETTINGS = ("nodes", "stages", "exchange", "takeover", "moves", "timing_only", "iterations", "churn_per_hour")


if __name__ == "__main__":
    raise SystemExit(main())
