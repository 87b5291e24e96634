"""Activation transport throughput between two processes, against a raw TCP socket measured in the same run.

    nice -n 19 python -m gwtf.benchmarks.transport --json OUT [--sizes 1 4 16 64] [--repeats 5]

A server process hosts two HivemindTransports on one p2p (one encrypts its direct TCP path, as nodes do by default,
one does not: `wire.encrypt = false`), each with a handler `sink` that answers a tiny ack, and a plain TCP socket
server that reads a length-prefixed payload into a preallocated buffer and acks it. The client process sends one
float32 tensor of each size per call, and the same bytes over the raw socket. Reported per size (1 MB = 2^20 bytes),
median of the repeats, in MB/s: transport (the direct path, encrypted: as nodes use it), direct_plain (the direct path
unencrypted), p2p_only (everything over hivemind's libp2p streams: the fallback for a peer whose direct port cannot be
reached; libp2p always encrypts, so it has no unencrypted variant), p2p_raw (the same bytes written to a bare libp2p
stream of hivemind's, with no gwtf framing, handler or copy: the ceiling of the fallback, which is the p2p daemons'
own), tcp; and each one's ratio to tcp, as a mean
with its 95 % t-interval over the repeats (each repeat times every kind once, back to back: the ratios of one
repeat share the machine's load of the moment).
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

from gwtf.benchmarks.stats import fmt, mean_ci
from gwtf.membership import LOOPBACK_KW

RUN = "bench"
RUN_PLAIN = "bench-plain"  # the server's transport whose direct path does not encrypt
KINDS = ("transport", "direct_plain", "p2p_only", "p2p_raw", "tcp")  # what is timed, per size
RAW_PROTOCOL = "gwtf-bench/raw"  # the bare libp2p stream: a length, the bytes, a one-byte ack
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
    await p2p.add_binary_stream_handler(RAW_PROTOCOL, _raw_stream_sink)
    raw = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_raw_tcp_server, args=(raw, max_bytes), daemon=True).start()
    conn.send({"maddrs": [str(m) for m in await p2p.get_visible_maddrs()], "tcp_port": raw.getsockname()[1]})
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until the client is done
    for transport in transports:
        await transport.shutdown()
    await p2p.shutdown()


async def _raw_stream_sink(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read a length-prefixed payload off a bare libp2p stream (chunks dropped as they come) and ack it."""
    n = int.from_bytes(await reader.readexactly(8), "big")
    while n > 0:
        chunk = await reader.read(min(n, 1 << 22))
        if not chunk:
            break
        n -= len(chunk)
    writer.write(b"k")
    await writer.drain()
    writer.close()


def _server_main(conn: Any, max_bytes: int) -> None:
    torch.set_num_threads(1)
    asyncio.run(_serve(conn, max_bytes))


# --- client -------------------------------------------------------------------------------------------------


def _time_raw(sock: socket.socket, payload: memoryview) -> float:
    start = time.perf_counter()
    sock.sendall(len(payload).to_bytes(8, "big"))
    sock.sendall(payload)
    if sock.recv(1) != b"k":
        raise RuntimeError("raw TCP server did not ack")
    return time.perf_counter() - start


async def _time_raw_stream(p2p: Any, peer: str, payload: memoryview) -> float:
    from hivemind.p2p import PeerID

    start = time.perf_counter()
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), RAW_PROTOCOL)
    try:
        writer.write(len(payload).to_bytes(8, "big"))
        writer.write(payload)
        await writer.drain()
        if await asyncio.wait_for(reader.readexactly(1), WAIT_S) != b"k":
            raise RuntimeError("the bare libp2p stream's server did not ack")
    finally:
        writer.close()
    return time.perf_counter() - start


async def _time_kind(kind: str, raw: socket.socket, payload: memoryview, sealed: Any, plain: Any, peer: str,
                     tensor: torch.Tensor) -> float:  # fmt: skip
    if kind == "tcp":
        return _time_raw(raw, payload)
    if kind == "p2p_raw":
        return await _time_raw_stream(sealed.p2p, peer, payload)
    if kind != "p2p_only":
        return await _time_call(sealed if kind == "transport" else plain, peer, tensor)
    sealed.direct_tcp_min_bytes = None  # the fallback: everything over libp2p streams
    try:
        return await _time_call(sealed, peer, tensor)
    finally:
        sealed.direct_tcp_min_bytes = 0


async def _time_call(transport: Any, peer: str, tensor: torch.Tensor) -> float:
    from gwtf.transport import Message

    msg = Message("forward", transport.run_id, tensors=[tensor])
    start = time.perf_counter()
    await transport.call(peer, "sink", msg, timeout=WAIT_S)
    return time.perf_counter() - start


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far of these processes and their descendants (the p2pd daemons), every thread."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            family = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for q in family:
            try:
                t = q.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                continue
    return total


async def _measure(info: dict[str, Any], sizes: list[int], repeats: int, server_pid: int) -> dict[str, dict[str, Any]]:
    """Per size, `repeats` rounds after one warm-up round; each round times one transfer of every kind back to back,
    so a load change on the machine hits them alike, and each kind's ratio to the round's raw TCP time is one
    sample. Reported: the median MB/s of each kind, each ratio's mean with its 95 % t-interval over the rounds, and
    the median CPU milliseconds per MB that both processes and their p2p daemons spent on each kind (what a loaded
    machine changes least: it says where a transfer's cost goes, not how the scheduler shared the cores)."""
    from hivemind.p2p import P2P, PeerID

    from gwtf.transport import HivemindTransport

    p2p = await P2P.create(initial_peers=info["maddrs"], **P2P_KW)
    sealed, plain = [await HivemindTransport.create(p2p, run) for run in (RUN, RUN_PLAIN)]  # the server decides
    peer = PeerID.from_base58(info["maddrs"][0].rsplit("/p2p/", 1)[1]).to_base58()
    pids = [os.getpid(), server_pid]
    raw = socket.create_connection(("127.0.0.1", info["tcp_port"]), timeout=WAIT_S)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    results: dict[str, dict[str, Any]] = {}
    try:
        for mb in sizes:
            tensor = torch.randn(mb * 2**20 // 4)
            payload = tensor.numpy().data.cast("B")
            seconds: dict[str, list[float]] = {k: [] for k in KINDS}
            cpu: dict[str, list[float]] = {k: [] for k in KINDS}
            for round_ in range(repeats + 1):  # round 0 warms up (connections, endpoints, buffers)
                times, cpu_used = {}, {}
                for kind in KINDS:
                    c0 = _cpu_seconds(pids)
                    times[kind] = await _time_kind(kind, raw, payload, sealed, plain, peer, tensor)
                    cpu_used[kind] = _cpu_seconds(pids) - c0
                if round_:
                    for kind in KINDS:
                        seconds[kind].append(times[kind])
                        cpu[kind].append(cpu_used[kind])
            row: dict[str, Any] = {f"{k}_mb_per_s": mb / statistics.median(seconds[k]) for k in KINDS}
            for k in KINDS[:-1]:
                row[f"{k}_ratio"] = mean_ci([tcp / t for tcp, t in zip(seconds["tcp"], seconds[k])])
            row["ratio"] = row["transport_ratio"]
            row["p2p_only_vs_raw_stream"] = mean_ci([r / t for r, t in zip(seconds["p2p_raw"], seconds["p2p_only"])])
            row.update({f"{k}_cpu_ms_per_mb": 1000 * statistics.median(cpu[k]) / mb for k in KINDS})
            results[str(mb)] = row
            speeds = "  ".join(f"{k} {row[f'{k}_mb_per_s']:.0f}" for k in KINDS)
            ratios = "".join(f"\n    {k} / tcp: {fmt(row[f'{k}_ratio'])}" for k in KINDS[:-1])
            ceiling = fmt(row["p2p_only_vs_raw_stream"])
            ratios += f"\n    p2p_only / p2p_raw (the fallback against its daemons' ceiling): {ceiling}"
            cpu_ms = "  ".join(f"{k} {row[f'{k}_cpu_ms_per_mb']:.2f}" for k in KINDS)
            print(f"{mb:>3} MB, MB/s (median): {speeds}{ratios}\n    CPU ms per MB, both ends: {cpu_ms}", flush=True)
    finally:
        raw.close()
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
        results = asyncio.run(_measure(parent.recv(), args.sizes, args.repeats, server.pid))
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
