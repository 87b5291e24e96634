"""gwtf: Go With The Flow. Crash-tolerant pipeline-parallel training on volunteer swarms.

Files:
    config.py      dataclass configs owned by their components, composed into one RunConfig; TOML + overrides
    data.py        tokenizers (byte-level, HF/GGUF), corpora (embedded stdlib corpus, files, HF datasets), packing,
                   deterministic disjoint shards, held-out validation split
    optim.py       the optimizer and learning-rate schedule shared by the local trainer and the swarm
    trainer.py     single-process reference trainer (`gwtf train-local`), the baseline for every swarm result
    transport.py   tensor messages (header, validation), in-process and hivemind P2P backends, link emulation
    membership.py  DHT records of the run and of every node (signed, expiring), heartbeats, run lookup
    stage.py       one replica of a relay stage: forward, backward (with recompute), gradient accumulation, optimizer
    datanode.py    a data node: stage 0, its data shard, microbatch driving, loss, iteration accounting
    node.py        node lifecycle: join, stage choice, state download, serving, leaving
    averaging.py   same-stage gradient averaging weighted by microbatches processed (hivemind averager)
    routing/       cost model, flow graph, ortools optimum, the decentralized GWTF agent, SWARM/round-robin/oracle
    recovery.py    stage rebuild strategies: CheckFree, CheckFree+, checkpoint, redundant, copy, random
    faults.py      the fault injector shared by tests and benchmarks
    metrics.py     JSON-lines metrics
    errors.py      UserError (one-line CLI errors), BadMessage, PeerError
    auth.py        runs by invitation: run keys, HMAC proofs over libp2p peer ids, signed DHT records
    swarm.py       assembling nodes from a run config; the in-process swarm used by tests
"""

__version__ = "0.1.0"
