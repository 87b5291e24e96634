"""The crash-injection harness (`python -m gwtf.benchmarks.churn`): a scenario's swarm as real processes on
127.0.0.1 under crashes and joins, the DeepSpeed checkpoint-restart baseline on the same schedule, and the report.
Its processes start through the one process launcher, gwtf.launch.processes.

Layers (each imports only those above it): scenario -> events, settings, results -> emulated_node ->
swarm_run, deepspeed_run -> compare -> report, cli. deepspeed_rank runs in its own processes.

Files:
    scenario.py        a scenario TOML: relays (NodeSpec), churn, trace; loaded and checked (load_scenario)
    events.py          the seeded event schedule (Event, draw_events) and the victims' draw both runs share
    settings.py        the run settings a scenario and variant give a run: swarm_settings_argv (`--set` on bootstrap)
    results.py         RunResult, what every run returns, and reading a data node's metrics while it is written
    emulated_node.py   a gwtf process with emulated compute speed (`python -m ...harness.emulated_node`)
    swarm_run.py       one run of the gwtf swarm as processes under churn (SwarmRun), the redundancy cost
    deepspeed_run.py   one run of the DeepSpeed baseline: placement grid, crashes, restarts from checkpoints
    deepspeed_rank.py  one DeepSpeed rank, its own process (`python -m ...harness.deepspeed_rank`)
    compare.py         `--compare` variants, and every variant of a scenario on the same schedule (run_scenario)
    report.py          the report: JSON figures per run, ratios between runs, PNG plots
    cli.py             the command line (`python -m gwtf.benchmarks.churn` runs its main)
"""
