"""Entry points a person runs.

Files:
    setup.sh       creates .venv and installs gwtf with its pinned dependencies (torch first, CPU wheel)
    bootstrap.py   start a run: DHT peer + run record, prints the address to pass as --initial-peers
    join.py        join a run as a relay or data node
    local_swarm.py start a whole swarm of processes on 127.0.0.1 (the demo and the tests use it)
"""
