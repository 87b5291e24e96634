"""Benchmarks: each prints a ratio against a baseline measured in the same run and writes JSON. Not tests.

Layering: benchmarks may import gwtf, gwtf.models and gwtf.launch (the process launcher, gwtf.launch.processes);
nothing outside benchmarks/ imports them.

Files:
    flow.py          GWTF routing vs the ortools optimum and the SWARM / round-robin baselines, in the simulator
    plan_bounds.py   what routing alone can gain on a harness scenario: every router's plan vs lower bounds
    throughput.py    swarm tokens/s vs train-local and DeepSpeed's pipeline engine
    ds_pipeline.py   DeepSpeed's pipeline engine on CPU on gwtf's staged modules (the static-pipeline baseline)
    transport.py     activation transport MB/s vs a raw TCP socket
    recovery.py      stage-recovery strategies under the same failure schedule
    finetune.py      fine-tuning throughput: `gwtf finetune`'s swarm vs single-process fine-tuning
    soak.py          a local swarm under churn for M minutes: resources over time, crashes, processes left behind
    churn.py         the crash-injection harness's command (`python -m gwtf.benchmarks.churn`)
    harness/         the crash-injection harness: scenarios, the swarm under churn, the DeepSpeed baseline, reports
    scenarios/       the harness's scenario TOML files (local, geo10, geo10-heavy, stage-loss, join-wave)
    all_scenarios.sh every scenario with its comparisons, one after the other
"""
