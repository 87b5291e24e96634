"""Transport: round trips on both backends, validation of everything received, timeouts, link emulation."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
import xxhash

from gwtf.errors import BadMessage, PeerError, UserError
from gwtf.transport import (
    InProcessNetwork,
    InProcessTransport,
    LinkEmulator,
    Message,
    MessageLimits,
    TensorSpec,
    Transport,
    TransportConfig,
    encode_frame,
    tensor_validator,
)
from gwtf.transport.channels import BytesReader

RUN = "run-a"


async def echo(msg: Message) -> Message:
    """Replies with the tensors doubled, and says who sent them."""
    return Message("reply", msg.run_id, tensors=[t * 2 for t in msg.tensors], meta={"sender": msg.sender})


def in_process_pair(**kw) -> tuple[InProcessTransport, InProcessTransport]:
    net = InProcessNetwork()
    server = InProcessTransport(net, "server", RUN, **kw)
    client = InProcessTransport(net, "client", RUN)
    server.add_handler("echo", echo)
    return client, server


async def check_round_trip(client: Transport, server: Transport) -> None:
    x = torch.randn(3, 4)
    tokens = torch.arange(6).reshape(2, 3)
    half = torch.randn(5, dtype=torch.bfloat16)
    msg = Message("forward", RUN, iteration=2, microbatch_id=7, stage=1, tensors=[x, tokens, half], meta={"k": [1]})
    reply = await client.call(server.peer_id, "echo", msg, timeout=10)
    assert reply.sender == server.peer_id and reply.meta == {"sender": client.peer_id}
    torch.testing.assert_close(reply.tensors[0], x * 2)
    assert torch.equal(reply.tensors[1], tokens * 2) and reply.tensors[1].dtype == torch.int64
    assert torch.equal(reply.tensors[2], half * 2) and reply.tensors[2].dtype == torch.bfloat16
    # > 4 MiB: beyond hivemind's unary cap
    big = torch.randn(5 << 18)  # 5 MiB of float32
    reply = await client.call(server.peer_id, "echo", Message("forward", RUN, tensors=[big]), timeout=30)
    assert torch.equal(reply.tensors[0], big * 2)


async def check_rejections(client: Transport, server: Transport) -> None:
    """Every kind of bad message is refused with its reason; the server keeps serving afterwards."""
    cases = [
        (Message("forward", "other-run", tensors=[torch.ones(2)]), "run id"),
        (Message("forward", RUN, tensors=[torch.tensor([1.0, float("nan")])]), "non-finite"),
        (Message("forward", RUN, tensors=[torch.tensor([float("inf")])]), "non-finite"),
        (Message("forward", RUN, tensors=[torch.ones(2, dtype=torch.complex64)]), "dtype complex64 not allowed"),
        (Message("forward", RUN, tensors=[torch.ones(1024)]), "exceed the limit"),
        (Message("forward", RUN, tensors=[torch.ones(2)] * 9), "tensors exceed"),
        (Message("forward", RUN, meta={"x": "y" * 300}), "meta of"),
        (Message("checked", RUN, stage=0, tensors=[torch.ones(2, 3)]), "shape (2, 3), expected (None, 4)"),
        (Message("checked", RUN, stage=5, tensors=[torch.ones(2, 4)]), "sender stage 5"),
    ]
    for msg, reason in cases:
        handler = "checked" if msg.kind == "checked" else "echo"
        with pytest.raises(PeerError, match="rejected: .*" + reason.replace("(", r"\(").replace(")", r"\)")):
            await client.call(server.peer_id, handler, msg, timeout=10)
    assert server.rejected == len(cases)
    reply = await client.call(
        server.peer_id, "checked", Message("checked", RUN, stage=0, tensors=[torch.ones(3, 4)]), 10
    )
    assert torch.equal(reply.tensors[0], torch.full((3, 4), 2.0))


def strict_limits() -> MessageLimits:
    return MessageLimits(max_tensor_bytes=2048, max_total_bytes=8192, max_tensors=8, max_meta_bytes=256)


def add_checked_handler(server: Transport) -> None:
    server.add_handler("checked", echo, tensor_validator([TensorSpec((None, 4), torch.float32)], stages=[0, 1]))


def test_in_process_round_trip() -> None:
    client, server = in_process_pair()
    asyncio.run(check_round_trip(client, server))


def test_in_process_messages_do_not_alias() -> None:
    async def keep(msg: Message) -> Message:
        msg.tensors[0].add_(1)  # the handler owns what it received
        return Message("ack", RUN, tensors=msg.tensors)

    client, server = in_process_pair()
    server.add_handler("keep", keep)
    x = torch.zeros(4)
    reply = asyncio.run(client.call("server", "keep", Message("forward", RUN, tensors=[x]), 5))
    assert torch.equal(x, torch.zeros(4)) and torch.equal(reply.tensors[0], torch.ones(4))


def test_in_process_rejections() -> None:
    client, server = in_process_pair(limits=strict_limits())
    add_checked_handler(server)
    asyncio.run(check_rejections(client, server))


def test_bad_checksum_and_garbage_rejected() -> None:
    client, server = in_process_pair()

    async def run() -> None:
        frame = encode_frame(Message("forward", RUN, tensors=[torch.ones(4)]), extra={"handler": "echo"})
        raw = bytearray(b"".join(frame))
        raw[-1] ^= 0xFF  # flip a bit in the padding: body no longer matches the crc
        for data, reason in [(bytes(raw), "checksum"), (b"GWT1" + bytes(12) + b"", "header is not JSON")]:
            reply = await server._serve_request("mallory", _reader(data))
            with pytest.raises(PeerError, match="rejected: " + reason):
                await client._read_reply("server", _reader(b"".join(reply)))
        assert (await client.call("server", "echo", Message("f", RUN, tensors=[torch.ones(1)]), 5)).tensors

    asyncio.run(run())
    assert server.rejected == 2


def _reader(data: bytes) -> BytesReader:
    return BytesReader(data)


def test_handler_exception_is_returned_and_node_survives() -> None:
    async def broken(msg: Message) -> Message:
        raise RuntimeError("boom")

    client, server = in_process_pair()
    server.add_handler("broken", broken)

    async def run() -> None:
        with pytest.raises(PeerError, match="RuntimeError: boom"):
            await client.call("server", "broken", Message("f", RUN), 5)
        with pytest.raises(PeerError, match="no handler"):
            await client.call("server", "missing", Message("f", RUN), 5)
        await check_round_trip(client, server)

    asyncio.run(run())


def test_validator_raises_bad_message_type() -> None:
    validate = tensor_validator([TensorSpec((2,), torch.int64)])
    with pytest.raises(BadMessage, match="dtype float32"):
        validate(Message("f", RUN, tensors=[torch.ones(2)]))


def test_in_process_crashed_and_hung_peers() -> None:
    net = InProcessNetwork()
    client = InProcessTransport(net, "client", RUN)
    server = InProcessTransport(net, "server", RUN)

    async def hang(msg: Message) -> Message:
        await asyncio.Event().wait()  # never answers
        raise AssertionError

    server.add_handler("hang", hang)

    async def run() -> None:
        start = time.monotonic()
        with pytest.raises(PeerError, match="timeout"):
            await client.call("server", "hang", Message("f", RUN), timeout=0.2)
        assert time.monotonic() - start < 1.0
        net.crash("server")
        with pytest.raises(PeerError, match="unreachable"):
            await client.call("server", "hang", Message("f", RUN), timeout=1)

    asyncio.run(run())


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan")])
def test_transport_config_refuses_a_non_positive_call_timeout(timeout: float) -> None:
    with pytest.raises(UserError, match="transport.call_timeout=.* must be positive"):
        TransportConfig(call_timeout=timeout)
    assert TransportConfig().call_timeout == 10.0 and TransportConfig(call_timeout=0.5).call_timeout == 0.5


# --- link emulation ------------------------------------------------------------------------------------------


def test_link_table_from_regions_file() -> None:
    emu = LinkEmulator()
    lat, bw = emu.link("Australia", "Belgium")
    assert lat == pytest.approx(0.129) and bw == pytest.approx(10.06 * 2**20)
    assert emu.link("Belgium", "Australia") == (lat, bw)
    assert emu.link("Iowa", "Iowa") == (pytest.approx(0.001), 2048 * 2**20)


def test_link_delay_is_latency_plus_size_over_bandwidth() -> None:
    scale = 0.1  # ~0.2 s in all: a loaded machine's few ms of timer slack stay well inside the tolerance
    emu = LinkEmulator(time_scale=scale)
    lat, bw = emu.link("Australia", "Belgium")
    nbytes = int(2 * bw)  # 2 s of transfer, unscaled

    async def run() -> float:
        start = time.monotonic()
        await emu.delay("Australia", "Belgium", nbytes)
        return time.monotonic() - start

    elapsed = asyncio.run(run())
    assert elapsed == pytest.approx((lat + 2.0) * scale, rel=0.25)


def test_link_bandwidth_is_shared_by_concurrent_transfers() -> None:
    scale = 0.02
    emu = LinkEmulator(time_scale=scale)
    lat, bw = emu.link("Japan", "London")

    async def timed(src: str, dst: str, nbytes: int) -> float:
        start = time.monotonic()
        await emu.delay(src, dst, nbytes)
        return time.monotonic() - start

    async def run() -> list[float]:
        one_s = int(bw)
        # two transfers share Japan->London; the reverse direction is a separate link
        return list(
            await asyncio.gather(
                timed("Japan", "London", one_s), timed("Japan", "London", 2 * one_s), timed("London", "Japan", one_s)
            )
        )

    small, large, reverse = asyncio.run(run())
    # shared: the 1 s transfer takes 2 s; then the 2 s one has 1 s left alone: 3 s in all
    assert small == pytest.approx((lat + 2.0) * scale, rel=0.25)
    assert large == pytest.approx((lat + 3.0) * scale, rel=0.25)
    assert reverse == pytest.approx((lat + 1.0) * scale, rel=0.25)


def test_emulated_call_is_delayed_both_ways() -> None:
    scale = 0.2
    net = InProcessNetwork()
    emu = LinkEmulator(time_scale=scale)
    client = InProcessTransport(net, "client", RUN, region="Australia", emulator=emu)
    server = InProcessTransport(net, "server", RUN, region="Belgium", emulator=emu)
    server.add_handler("echo", echo)
    lat, bw = emu.link("Australia", "Belgium")
    x = torch.zeros(int(bw) // 16)  # 0.25 s of transfer each way, unscaled

    async def run() -> float:
        start = time.monotonic()
        await client.call("server", "echo", Message("f", RUN, tensors=[x]), timeout=10)
        return time.monotonic() - start

    expected = 2 * (lat + 0.25) * scale
    elapsed = asyncio.run(run())
    assert expected * 0.95 <= elapsed <= expected + 0.1  # the slack is encoding and checking, not link time


def test_frame_checksum_covers_body() -> None:
    frame = encode_frame(Message("f", RUN, tensors=[torch.ones(3)]), extra={})
    header = frame[1]
    body = b"".join(bytes(b) for b in frame[2:])
    assert isinstance(header, bytes) and f'"xxh3":{xxhash.xxh3_64_intdigest(body)}' in header.decode()


# --- hivemind backend ----------------------------------------------------------------------------------------

P2P_KW = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False, use_relay=False)


async def hivemind_pair(**server_kw):
    from hivemind.p2p import P2P

    from gwtf.transport import HivemindTransport

    p2p_a = await P2P.create(**P2P_KW)
    p2p_b = await P2P.create(initial_peers=await p2p_a.get_visible_maddrs(), **P2P_KW)
    server = await HivemindTransport.create(p2p_a, RUN, **server_kw)
    client = await HivemindTransport.create(p2p_b, RUN)
    server.add_handler("echo", echo)
    return client, server


async def close_all(*transports) -> None:
    for t in transports:
        await t.shutdown()
        await t.p2p.shutdown()


@pytest.mark.parametrize("direct_tcp", [True, False], ids=["p2p+tcp", "p2p-only"])
def test_hivemind_round_trip_and_rejections(direct_tcp: bool) -> None:
    async def run() -> None:
        client, server = await hivemind_pair()
        if not direct_tcp:
            client.direct_tcp_min_bytes = None
        try:
            await check_round_trip(client, server)
            assert bool(client._direct.idle.get(server.peer_id)) == direct_tcp  # the big message took the TCP path
        finally:
            await close_all(client, server)

    asyncio.run(run())


def test_hivemind_rejections_keep_node_serving() -> None:
    async def run() -> None:
        client, server = await hivemind_pair(limits=strict_limits())
        client.direct_tcp_min_bytes = 1024  # some of the bad messages go over TCP, some over P2P
        add_checked_handler(server)
        try:
            await check_rejections(client, server)
        finally:
            await close_all(client, server)

    asyncio.run(run())


def test_hivemind_dead_peer_times_out() -> None:
    async def run() -> None:
        client, server = await hivemind_pair()
        dead = server.peer_id
        await client.call(dead, "echo", Message("f", RUN, tensors=[torch.ones(1 << 20)]), timeout=10)  # TCP is up
        await server.shutdown()
        await server.p2p.shutdown()
        try:
            for size in (1, 1 << 20):  # P2P path, then the TCP path over the connection kept from before
                start = time.monotonic()
                with pytest.raises(PeerError):
                    await client.call(dead, "echo", Message("f", RUN, tensors=[torch.ones(size)]), timeout=2)
                assert time.monotonic() - start < 3
        finally:
            await close_all(client)

    asyncio.run(run())


def test_direct_tcp_refuses_unknown_token() -> None:
    async def run() -> None:
        client, server = await hivemind_pair()
        try:
            assert server._direct.server is not None
            reader, writer = await asyncio.open_connection(*server._direct.server.getsockname()[:2])
            writer.write(bytes(16))  # a token nobody was given
            for buf in encode_frame(Message("f", RUN, tensors=[torch.ones(4)]), extra={"handler": "echo"}):
                writer.write(buf)
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:  # closed with our frame unread
                answer = b""
            assert answer == b""  # closed, no reply
            assert server.rejected == 0  # never reached the handler's checks
            writer.close()
        finally:
            await close_all(client, server)

    asyncio.run(run())


# --- receive buffers (gwtf/transport/buffers.py) -------------------------------------------------------------


def test_buffer_pool_reuses_a_buffer_only_once_its_tensors_are_freed() -> None:
    from gwtf.transport.buffers import MIN_POOLED_BYTES, BufferPool

    pool = BufferPool(max_idle_bytes=4 * MIN_POOLED_BYTES)
    first = pool.take(MIN_POOLED_BYTES)
    kept = torch.frombuffer(first, dtype=torch.uint8)  # as decode_body makes tensors: views that keep it alive
    address = kept.data_ptr()
    del first
    assert pool.idle_bytes == 0  # a tensor still views it
    second = pool.take(MIN_POOLED_BYTES)
    assert second.ctypes.data != address and pool.misses == 2
    del kept, second
    third = pool.take(MIN_POOLED_BYTES)  # both came back; one is taken again, same memory as before
    assert pool.hits == 1 and pool.idle_bytes == MIN_POOLED_BYTES and third.nbytes == MIN_POOLED_BYTES
    small = pool.take(100)  # below the pooled sizes: plain memory, never kept
    del small, third
    assert pool.idle_bytes == 2 * MIN_POOLED_BYTES
    held = [pool.take(MIN_POOLED_BYTES * 3) for _ in range(2)]  # returned together: over the idle bound
    del held
    assert pool.idle_bytes <= pool.max_idle_bytes and pool.hits == 1
    assert not BufferPool(pin_memory=True).pin_memory or torch.cuda.is_available()  # pinning only with CUDA


def test_kept_tensors_survive_later_messages_in_reused_buffers() -> None:
    """A handler may keep what it received (a relay keeps activations until their backward): later frames of the
    same size must land elsewhere, and a freed message's buffer is what the next one reuses."""
    kept: list[torch.Tensor] = []

    async def keep(msg: Message) -> Message:
        if msg.meta.get("keep"):
            kept.append(msg.tensors[0])
        return Message("ack", RUN)

    async def run() -> None:
        client, server = in_process_pair()
        server.add_handler("keep", keep)
        sent = [torch.full((1 << 16,), float(i)) for i in range(6)]  # 256 KiB bodies: pooled
        for i, x in enumerate(sent):
            await client.call("server", "keep", Message("forward", RUN, tensors=[x], meta={"keep": i % 2 == 0}), 5)
        assert [float(t[0]) for t in kept] == [0.0, 2.0, 4.0] and all(bool((t == t[0]).all()) for t in kept)
        assert server.buffers.hits >= 2  # the frames not kept were freed, and their buffers used again

    asyncio.run(run())
