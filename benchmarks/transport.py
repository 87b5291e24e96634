"""Activation transport throughput between two processes, against a raw TCP socket measured in the same run.

    nice -n 19 python -m gwtf.benchmarks.transport --json OUT [--sizes 1 4 16 64] [--repeats 5]

A server process hosts two HivemindTransports on one p2p (one encrypts its direct TCP path, as nodes do by default,
one does not: `wire.encrypt = false`), each with a handler `sink` that answers a tiny ack, and a plain TCP socket
server that reads a length-prefixed payload into a preallocated buffer and acks it. The client process sends one
float32 tensor of each size per call, and the same bytes over the raw socket. Reported per size (1 MB = 2^20 bytes),
median of the repeats, in MB/s: transport (the direct path, encrypted: as nodes use it), direct_plain (the direct path
unencrypted), p2p_only (everything over hivemind's libp2p streams: the fallback for a peer whose direct port cannot be
reached; libp2p always encrypts, so it has no unencrypted variant), tcp; and each one's ratio to tcp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import threading
import time
from typing import Any

import torch

from gwtf.membership import LOOPBACK_KW

RUN = "bench"
RUN_PLAIN = "bench-plain"  # the server's transport whose direct path does not encrypt
KINDS = ("transport", "direct_plain", "p2p_only", "tcp")  # what is timed, per size
P2P_KW: dict[str, Any] = LOOPBACK_KW  # loopback only, no NAT traversal or relays (as every node here)
WAIT_S = 120.0


# --- server process -----------------------------------------------------------------------------------------


def _raw_tcp_server(server: socket.socket, max_bytes: int) -> None:
    buf = memoryview(bytearray(max_bytes))
    while True:
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while _serve_raw(conn, buf):
                pass


def _serve_raw(conn: socket.socket, buf: memoryview) -> bool:
    header = conn.recv(8, socket.MSG_WAITALL)
    if len(header) < 8:
        return False
    n, got = int.from_bytes(header, "big"), 0
    while got < n:
        step = conn.recv_into(buf[got:n])
        if step == 0:
            return False
        got += step
    conn.sendall(b"k")
    return True


async def _serve(conn: Any, max_bytes: int) -> None:
    from hivemind.p2p import P2P

    from gwtf.transport import HivemindTransport, Message

    p2p = await P2P.create(**P2P_KW)
    transports = [await HivemindTransport.create(p2p, run, encrypt=run == RUN) for run in (RUN, RUN_PLAIN)]
    for transport in transports:

        async def sink(msg: Message) -> Message:
            return Message("ack", msg.run_id, meta={"n": len(msg.tensors)})

        transport.add_handler("sink", sink)
    raw = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_raw_tcp_server, args=(raw, max_bytes), daemon=True).start()
    conn.send({"maddrs": [str(m) for m in await p2p.get_visible_maddrs()], "tcp_port": raw.getsockname()[1]})
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until the client is done
    for transport in transports:
        await transport.shutdown()
    await p2p.shutdown()


def _server_main(conn: Any, max_bytes: int) -> None:
    torch.set_num_threads(1)
    asyncio.run(_serve(conn, max_bytes))


# --- client -------------------------------------------------------------------------------------------------


def _time_raw(port: int, payload: memoryview, repeats: int) -> list[float]:
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(repeats + 1):  # the first one warms up
            start = time.perf_counter()
            sock.sendall(len(payload).to_bytes(8, "big"))
            sock.sendall(payload)
            if sock.recv(1) != b"k":
                raise RuntimeError("raw TCP server did not ack")
            times.append(time.perf_counter() - start)
    return times[1:]


async def _time_transport(transport: Any, peer: str, tensor: torch.Tensor, repeats: int) -> list[float]:
    from gwtf.transport import Message

    times = []
    for _ in range(repeats + 1):
        msg = Message("forward", transport.run_id, tensors=[tensor])
        start = time.perf_counter()
        await transport.call(peer, "sink", msg, timeout=WAIT_S)
        times.append(time.perf_counter() - start)
    return times[1:]


async def _measure(info: dict[str, Any], sizes: list[int], repeats: int) -> dict[str, dict[str, float]]:
    from hivemind.p2p import P2P, PeerID

    from gwtf.transport import HivemindTransport

    p2p = await P2P.create(initial_peers=info["maddrs"], **P2P_KW)
    sealed, plain = [await HivemindTransport.create(p2p, run) for run in (RUN, RUN_PLAIN)]  # the server decides
    peer = PeerID.from_base58(info["maddrs"][0].rsplit("/p2p/", 1)[1]).to_base58()
    results: dict[str, dict[str, float]] = {}
    try:
        for mb in sizes:
            tensor = torch.randn(mb * 2**20 // 4)
            payload = tensor.numpy().data.cast("B")
            seconds = {"tcp": statistics.median(_time_raw(info["tcp_port"], payload, repeats))}
            seconds["transport"] = statistics.median(await _time_transport(sealed, peer, tensor, repeats))
            seconds["direct_plain"] = statistics.median(await _time_transport(plain, peer, tensor, repeats))
            sealed.direct_tcp_min_bytes = None
            seconds["p2p_only"] = statistics.median(await _time_transport(sealed, peer, tensor, repeats))
            sealed.direct_tcp_min_bytes = 0
            row = {f"{k}_mb_per_s": mb / seconds[k] for k in KINDS}
            row.update({f"{k}_ratio": seconds["tcp"] / seconds[k] for k in KINDS if k != "tcp"})
            row["ratio"] = row["transport_ratio"]
            results[str(mb)] = row
            print(f"{mb:>3} MB  " + "  ".join(f"{k} {v:8.2f}" for k, v in row.items()), flush=True)
    finally:
        for transport in (sealed, plain):
            await transport.shutdown()
        await p2p.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64], help="tensor sizes in MB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_server_main, args=(child, max(args.sizes) * 2**20), daemon=True)
    server.start()
    try:
        if not parent.poll(WAIT_S):
            raise RuntimeError("the server process did not start in time")
        results = asyncio.run(_measure(parent.recv(), args.sizes, args.repeats))
        parent.send("done")
        server.join(timeout=10)
    finally:
        if server.is_alive():
            server.terminate()
    out: dict[str, Any] = {"sizes_mb": args.sizes, "repeats": args.repeats}
    for key in next(iter(results.values())):
        out[key] = {size: r[key] for size, r in results.items()}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
