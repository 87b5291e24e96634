"""Benchmarks: each prints a ratio against a baseline measured in the same run and writes JSON. Not tests.

Files:
    flow.py        GWTF routing vs the ortools optimum and the SWARM / round-robin baselines, in the simulator
    throughput.py  swarm tokens/s vs train-local and DeepSpeed's pipeline engine
    transport.py   activation transport MB/s vs a raw TCP socket
    recovery.py    stage-recovery strategies under the same failure schedule
"""
