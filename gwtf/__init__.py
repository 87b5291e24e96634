"""gwtf: Go With The Flow. Crash-tolerant pipeline-parallel training on volunteer swarms.

Installed as one package: the repo's models/, launch/ and benchmarks/ folders install as gwtf.models, gwtf.launch
(every `gwtf` command) and gwtf.benchmarks. The layers, each importing only those below it:
    launch/, benchmarks/ -> dashboard/ -> runtime/ -> telemetry -> routing/, recovery/, averaging, membership,
    transport -> models/, data, ...

Files:
    config.py      RunConfig: every component's own config composed into one (TOML, `section.key=value`
                   overrides, the run record's dict)
    errors.py      UserError (one-line CLI errors), BadMessage, PeerError
    data.py        tokenizers (byte-level, HF/GGUF), corpora (the embedded corpus, files, HF datasets), packing,
                   deterministic disjoint shards, held-out validation split (by document, or by rows), loss masks
    records.py     fine-tuning rows through Hugging Face `datasets` (JSON lines, CSV, Parquet, saved datasets):
                   text, chat `messages` (the tokenizer's template, assistant turns trained), prompt/completion
    lora.py        LoRA adapters across the swarm (`[lora]`): peft's LoRA on each stage's modules, a frozen base,
                   only adapters trained, averaged and moved; merged or peft-directory export
    optim.py       the optimizer and learning-rate schedule shared by the local trainer and the swarm
    trainer.py     single-process reference trainer (`gwtf train-local`), the baseline for every swarm result
    stage.py       one replica of a relay stage: forward, backward (with recompute), gradient accumulation, optimizer
    device.py      a node's device (--device auto|cpu|cuda[:N]) and the run's precision (fp32 | bf16): CPU tensors
                   to and from the compute thread, device-synchronized timers, bf16 autocast
    sizing.py      sizes in bytes: transfer waits from bytes over the floor bandwidth, byte-sized chunks, a relay's
                   capacity from its device's free memory and the measured bytes a held microbatch keeps
    transport/     tensor messages (wire format, validation), in-process and hivemind P2P backends, the direct TCP
                   path, link emulation, TransportConfig
    auth.py        runs by invitation: run keys, HMAC proofs over libp2p peer ids, signed DHT records
    membership.py  DHT records of the run and of every node (signed, expiring), heartbeats, run lookup
    liveness.py    probing peers (is it there?), shared by data nodes, averaging and standby volunteers
    averaging.py   same-stage gradient averaging weighted by microbatches processed, screened by the leader
    placement.py   choose_stage: where a volunteer adds the most throughput
    faults.py      the fault injector shared by tests and benchmarks
    resume.py      a run's whole state on disk (`gwtf export` writes it), to go on from with `bootstrap --resume`
    dht.py         ThreadDHT: hivemind's DHTNode on a thread of the node's process (no forked DHT process)
    lifecycle.py   a node's helper processes (p2pd, anything forked) end with it, SIGKILL included
    metrics.py     JSON-lines metrics
    telemetry.py   what a data node publishes for watchers (history, flows, plan, events, bytes per message kind);
                   routing_gap: a plan's throughput and worst path against the optimum
    tensorboard.py TensorBoard scalars of a run (`--tensorboard DIR`): a data node's iterations, the routing's gap
    node_states.py why a node is or is not routed through, in words (`gwtf status`): stale, full, unreachable...
    routing/       cost model, flow graph, ortools optimum, the decentralized GWTF agent, SWARM/round-robin/oracle;
                   the router interface, its registry and RoutingConfig
    recovery/      stage rebuild strategies (CheckFree, CheckFree+, copy, random, redundant, checkpoint): one
                   interface with the hooks a live relay calls, a registry, RecoveryConfig, the failure model
    runtime/       the live swarm's nodes: relays and data nodes, their RPC schema, their assembly from a run
    dashboard/     the live web dashboard (`gwtf dashboard`): its data model, aiohttp server and static page
    resources/     regions.json (the inter-region link table: latency, bandwidth); the embedded corpus, a fixed
                   snapshot of CPython 3.11.7's standard library text, with its PSF license
"""

__version__ = "0.1.0"
