"""Benchmarks: each prints a ratio against a baseline measured in the same run and writes JSON. Not tests.

Layering: benchmarks may import gwtf, gwtf.models and gwtf.launch (the process launcher, gwtf.launch.processes);
nothing outside benchmarks/ imports them.

Files:
    flow.py          GWTF routing vs the ortools optimum and the SWARM / round-robin baselines, in the simulator
    stats.py         means with 95 % t-intervals over repeated runs (mean_ci), for every benchmark's report
    plan_bounds.py   what routing alone can gain on a harness scenario (or flow.py's random swarm): every router's
                     plan vs the best plans of GWTF's objective, of a congestion-aware one, of a search, lower bounds
    throughput.py    swarm tokens/s vs train-local and DeepSpeed's pipeline engine; the swarm's CPU per step by
                     process kind, DHT reads and writes per step and PSS per node (node, p2pd, watchdog)
    ds_pipeline.py   DeepSpeed's pipeline engine on CPU on gwtf's staged modules (the static-pipeline baseline)
    transport.py     activation transport MB/s vs a raw TCP socket: direct path encrypted and not, libp2p streams;
                     ratios with 95 % intervals over repeats, CPU ms per MB of both ends
    compression.py   wire codecs vs fp32: bytes per microbatch, loss after N steps, iteration time on geo10 links
    codec_fidelity.py  where a codec's error goes: one step with the forward activations, or the backward
                     gradients, quantized at every stage boundary (the parameters' gradient vs the exact one)
    recovery.py      stage-recovery strategies under the same failure schedule
    finetune.py      fine-tuning throughput: `gwtf finetune`'s swarm vs single-process fine-tuning; --lora: full
                     fine-tuning vs LoRA (bytes averaged and downloaded per step, tokens/s, validation loss)
    soak.py          a local swarm under churn for M minutes: resources over time, crashes, processes left behind
    gpu_check.py     a volunteer's GPU check: swarm vs single process on CUDA, GPU donor to CPU joiner, CPU/GPU drift,
                     memory per held microbatch (checkpointing, precision), the event loop's ack delay
    memory.py        per preset, a relay stage's parameters, optimizer state, measured bytes kept per held
                     microbatch (fp32/bf16, checkpointing off/on) and the capacity derived for a device memory
    churn.py         the crash-injection harness's command (`python -m gwtf.benchmarks.churn`)
    results_table.py the README's results table from the harness's JSON reports: ratios with intervals, commands
    harness/         the crash-injection harness: scenarios, the swarm under churn, the DeepSpeed baseline, reports
    scenarios/       the harness's scenario TOML files (local, geo10, geo10-heavy, stage-loss, join-wave)
    all_scenarios.sh every scenario with its comparisons, one after the other
"""
