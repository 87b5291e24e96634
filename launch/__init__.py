"""Entry points a person runs: every `gwtf` command (installed as gwtf.launch, so an install claims no generic
top-level name).

Layering: launch/ imports gwtf and gwtf.models, never benchmarks/; gwtf/ and models/ never import launch/.

Files:
    cli.py         the `gwtf` command line: a dispatcher over the command modules below
    status.py      `gwtf status`
    dashboard.py   `gwtf dashboard`: a live web page of a run (a DHT client); `start_dashboard` for launchers
    train_local.py `gwtf train-local`
    convert.py     `gwtf convert` and `gwtf export`
    export_run.py  fetch a live run's model from its nodes as a Hugging Face directory, and its state (gwtf.resume)
    finetune.py    `gwtf finetune`: convert, local swarm with a crash, export; validation loss and samples before
                   and after; LoRA (--lora), --resume
    generate.py    `gwtf generate`: continue prompts with an exported model, or chat with it (--chat)
    setup.sh       creates .venv and installs gwtf with its pinned dependencies (torch first, CPU wheel)
    bootstrap.py   start a run (or resume one from its export): DHT peer + run record, prints the address to pass
                   as --initial-peers
    join.py        join a run as a relay or data node
    network.py     the address flags of bootstrap, join and doctor (--host-maddrs, --announce-maddrs, --use-relay)
    doctor.py      `gwtf doctor`: whether the peers of a run can reach this machine (direct TCP dial-back)
    processes.py   the one process launcher: start `gwtf` processes with their logs, bounded waits, stop and reap
    zygote.py      the process a launcher forks nodes from, torch, transformers and hivemind imported once
    local_swarm.py `gwtf demo`: a whole swarm of processes on 127.0.0.1 with a crash (finetune and the tests use it)
"""
