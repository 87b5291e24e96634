"""The direct path's encryption (gwtf/transport/crypto.py): frames round-trip sealed; a tampered, replayed or
wrong-key record is refused in one log line and its connection dropped, and the node keeps serving."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
import torch

from gwtf.auth import RunAccess
from gwtf.transport import Message
from gwtf.transport.crypto import CIPHERS, RECORD_BYTES, SecureChannel, Tampered, derive_keys
from gwtf.transport.frame import encode_frame
from tests.test_transport import RUN, close_all, hivemind_pair


def _pair() -> tuple[SecureChannel, SecureChannel]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
    up, down = derive_keys(b"k" * 32, b"s" * 32, RUN, "caller", "server", b"c" * 16, b"n" * 16)
    return SecureChannel(a, up, down), SecureChannel(b, down, up)


@pytest.mark.parametrize("nbytes", [10, RECORD_BYTES + 7, 5 * RECORD_BYTES + 3], ids=["small", "2 records", "big"])
def test_sealed_frames_round_trip(nbytes: int) -> None:
    """A frame (prefix, header, body) read back as the transport reads it: the prefix and header are a record of their
    own, the body's records follow (so they open straight into the body's buffer), and the records of a send are
    sealed into one reused buffer without mixing up the next send's."""

    async def run() -> None:
        caller, server = _pair()
        payload = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy().tobytes()
        for i in range(3):  # the counters advance on both sides in step; the send buffer is reused
            body = bytes([i]) + payload
            sent = asyncio.ensure_future(caller.send([b"pre", b"header", memoryview(body)]))
            assert await server.read_exactly(3) == b"pre" and await server.read_exactly(6) == b"header"
            got = memoryview(bytearray(len(body)))
            await server.read_into(got)
            await sent
            assert bytes(got) == body
            assert caller._sent == (i + 1) * (1 + -(-len(body) // RECORD_BYTES))
        caller.sock.close(), server.sock.close()

    asyncio.run(run())


def test_keys_differ_per_direction_peer_and_nonce() -> None:
    base = derive_keys(None, b"s" * 32, RUN, "a", "b", b"1" * 16, b"2" * 16)
    assert base[0] != base[1]
    assert derive_keys(None, b"s" * 32, RUN, "b", "a", b"1" * 16, b"2" * 16) != base
    assert derive_keys(None, b"s" * 32, RUN, "a", "b", b"3" * 16, b"2" * 16) != base
    assert derive_keys(b"k" * 32, b"s" * 32, RUN, "a", "b", b"1" * 16, b"2" * 16) != base


def test_the_direct_path_is_sealed_on_the_wire() -> None:
    """What a listener on the path sees of a frame is not its bytes."""

    async def run() -> None:
        caller, server = _pair()
        marker = b"PLAINTEXT-MARKER" * 64
        await caller.send([marker])
        raw = server.sock.recv(1 << 16)
        assert marker[:16] not in raw and len(raw) == len(marker) + 4 + 16
        caller.sock.close(), server.sock.close()

    asyncio.run(run())


# --- against a live node: one line, the connection dropped, the node keeps serving -------------------------------


async def _raw_channel(client, server, secret: bytes | None = None):
    """A handshaken connection to `server`'s direct path as `client`, keyed with `secret` (default: the right one)."""
    endpoint = await client._direct.endpoint(server.peer_id)
    if secret is None:
        return await client._direct._dial(endpoint.hosts[0], endpoint, server.peer_id)
    from dataclasses import replace

    return await client._direct._dial(endpoint.hosts[0], replace(endpoint, secret=secret), server.peer_id)


def _request(client, server) -> list:
    msg = Message("f", RUN, tensors=[torch.ones(1000)])
    return encode_frame(msg, extra=client._request_extra(server.peer_id, "echo"))


async def _is_dropped(channel) -> bool:
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(channel.sock, 1), 5) == b""
    except ConnectionResetError:
        return True


async def _still_serves(client, server) -> None:
    reply = await client.call(server.peer_id, "echo", Message("f", RUN, tensors=[torch.ones(1 << 16)]), timeout=10)
    assert torch.equal(reply.tensors[0], 2 * torch.ones(1 << 16))  # echo doubles


@pytest.mark.parametrize("attack", ["tampered", "replayed", "wrong key"])
def test_bad_records_are_refused_in_one_line_and_the_node_goes_on(attack: str, caplog) -> None:
    async def run() -> None:
        client, server = await hivemind_pair(access=RunAccess(RUN, b"r" * 32))
        client.access, client._direct._run_key = server.access, server.access.key  # both members of the keyed run
        try:
            channel = await _raw_channel(client, server, secret=b"x" * 32 if attack == "wrong key" else None)
            records = [bytes(r) for r in channel._sealed_records(_request(client, server))]  # copied: reused buffer
            loop = asyncio.get_running_loop()
            if attack == "tampered":
                records[-1] = records[-1][:-20] + bytes([records[-1][-20] ^ 1]) + records[-1][-19:]
            elif attack == "replayed":
                for record in records:  # the genuine request is answered ...
                    await loop.sock_sendall(channel.sock, record)
                reply = await client._read_reply(server.peer_id, channel)
                assert torch.equal(reply.tensors[0], 2 * torch.ones(1000))
            with caplog.at_level(logging.WARNING, logger="gwtf.transport.direct"):
                for record in records:  # ... its records sent again are not
                    await loop.sock_sendall(channel.sock, record)
                assert await _is_dropped(channel)
            lines = [r for r in caplog.records if "dropped the direct connection" in r.getMessage()]
            assert len(lines) == 1 and "failed authentication" in lines[0].getMessage()
            assert server.rejected == 0  # refused below the frame checks: no handler saw anything
            channel.sock.close()
            await _still_serves(client, server)
        finally:
            await close_all(client, server)

    asyncio.run(run())


def test_a_reply_that_fails_authentication_is_a_peer_error() -> None:
    async def run() -> None:
        caller, server = _pair()
        await server.send([b"\0" * 8])
        server._sent = 0  # the server "replays" its first record: the caller expects record 1
        await server.send([b"\0" * 8])
        assert await caller.read_exactly(8) == b"\0" * 8
        with pytest.raises(Tampered, match="failed authentication"):
            await caller.read_exactly(8)
        caller.sock.close(), server.sock.close()

    asyncio.run(run())


def test_a_plain_run_still_works_and_both_ends_follow_the_server() -> None:
    async def run() -> None:
        client, server = await hivemind_pair(encrypt=False)
        try:
            await _still_serves(client, server)
            assert type(client._direct.idle[server.peer_id][0]).__name__ == "PlainChannel"
        finally:
            await close_all(client, server)

    asyncio.run(run())


# --- codecs (gwtf/transport/codecs.py) ----------------------------------------------------------------------------

from gwtf.errors import BadMessage  # noqa: E402
from gwtf.transport import MessageLimits  # noqa: E402
from gwtf.transport.codecs import BLOCK, ROWS, SMALL_BLOCK, WireCodecs, decode, encode  # noqa: E402
from gwtf.transport.config import WireConfig  # noqa: E402


def _activations(n: int = 3 * BLOCK + 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, generator=g) * 3.0 + 0.5


@pytest.mark.parametrize("codec", ["fp16", "bf16", "uint8", "blockwise8", "blockwise64"])
def test_each_codec_round_trips_within_its_bound(codec: str) -> None:
    x = _activations()
    parts = encode(x, codec)
    y = decode(parts, codec, torch.float32, list(x.shape))
    err = (y - x).abs()
    wire = sum(p.numel() * p.element_size() for p in parts)
    if codec in ("fp16", "bf16"):
        bound = x.abs() * (2**-11 if codec == "fp16" else 2**-8)  # half an ulp, relative
        assert bool((err <= bound + 1e-12).all()) and wire == 2 * x.numel()
    elif codec == "uint8":
        sigma = x.std()
        inside = (x - x.mean()).abs() < 2.9 * sigma  # 256 bins over mean +- 3 sigma: past that, clipped by design
        assert float(err[inside].max()) <= 6 * sigma / 256 + 1e-6  # within one bin
        assert wire == x.numel() + 256 * 4  # a byte a value and the 256 bins' means
    else:
        block = BLOCK if codec == "blockwise8" else SMALL_BLOCK
        blocks = torch.nn.functional.pad(x, (0, (-x.numel()) % block)).view(-1, block)
        step = (blocks.abs().amax(1, keepdim=True) / 127).expand_as(blocks).reshape(-1)[: x.numel()]
        assert bool((err <= step / 2 + 1e-6).all())  # round to nearest: half a step
        assert wire <= (0.26 if codec == "blockwise8" else 0.27) * 4 * x.numel()


def test_channel8_rounds_each_channel_within_half_its_step_and_keeps_outlier_channels_apart() -> None:
    # Hidden states (2 sequences, 70 positions, 96 channels) with one outlier channel, as a trained transformer's:
    # channel8 scales each channel over runs of ROWS positions, so the outlier costs only its own channel.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 70, 96, generator=g)
    x[:, :, 7] *= 300.0
    parts = encode(x, "channel8")
    y = decode(parts, "channel8", torch.float32, list(x.shape))
    cols = torch.nn.functional.pad(x.transpose(1, 2), (0, 2 * ROWS - 70)).reshape(2, 96, 2, ROWS)
    step = (cols.abs().amax(-1, keepdim=True) / 127).expand_as(cols).reshape(2, 96, 2 * ROWS)[:, :, :70]
    assert bool(((y - x).abs() <= step.transpose(1, 2) / 2 + 1e-6).all())  # round to nearest: half a step
    wire = sum(p.numel() * p.element_size() for p in parts)
    assert wire == x.numel() + 4 * 2 * 96 * 2  # a byte a value, a float32 scale per channel per run (70 = 64 + 6)
    full = torch.randn(2, 128, 96, generator=g)  # whole runs: 1.0625 bytes a value
    assert sum(p.numel() * p.element_size() for p in encode(full, "channel8")) <= 0.27 * 4 * full.numel()
    flat = decode(encode(x, "blockwise8"), "blockwise8", torch.float32, list(x.shape))
    rest = torch.ones(96, dtype=torch.bool)
    rest[7] = False
    err = lambda z: float((z - x)[:, :, rest].norm() / x[:, :, rest].norm())  # noqa: E731
    assert err(y) < 0.01 < 0.2 < err(flat)  # the outlier drowns blockwise8's other channels, not channel8's
    # A 1-D tensor is one channel; parts that do not fit the declared shape are refused.
    v = torch.randn(3000, generator=g)
    assert float((decode(encode(v, "channel8"), "channel8", torch.float32, [3000]) - v).abs().max()) < 0.05
    codecs = WireCodecs()
    codecs.use(WireConfig(activations="channel8"))
    sent, entries = codecs.compress(Message("forward", RUN, tensors=[x]), request=True)
    entries[0][2] = [2, 96, 70]  # the same numel, another layout: its scales no longer fit
    with pytest.raises(BadMessage, match="parts do not fit"):
        WireCodecs.decompress(sent, entries, MessageLimits())


def test_blockwise64_keeps_a_massive_token_and_an_outlier_channel_to_their_own_blocks() -> None:
    """A trained model's hidden states (SmolLM2-135M's): outlier channels, and a few tokens (an attention sink) whose
    values are hundreds of times the others'. channel8 scales a channel over 64 tokens, so the massive token sets
    the step of every other token in its channels; blockwise64's blocks are 64 channels of one token."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 70, 128, generator=g)
    x[:, :, 7] *= 30.0  # an outlier channel
    x[:, 0, :] *= 300.0  # a massive token
    others = torch.ones_like(x, dtype=torch.bool)
    others[:, 0, :] = False
    others[:, :, :64] = False  # the blocks that hold the outlier channel
    err = lambda codec: float(  # noqa: E731
        (decode(encode(x, codec), codec, torch.float32, list(x.shape)) - x)[others].norm() / x[others].norm()
    )
    assert err("blockwise64") < 0.01 < 0.05 < err("channel8")  # the massive token drowns channel8's other tokens
    assert sum(p.numel() * p.element_size() for p in encode(x, "blockwise64")) <= 0.27 * 4 * x.numel()
    # Its pipeline gradients round to nearest (measured better on SmolLM2), its averaging stochastically.
    codecs = WireCodecs()
    codecs.use(WireConfig(gradients="blockwise64", averaging="blockwise64"))
    y = torch.randn(4, 256, generator=g)
    grads = [WireCodecs.decompress(*codecs.compress(Message("backward", RUN, tensors=[y]), request=True),
                                   MessageLimits()).tensors[0] for _ in range(2)]  # fmt: skip
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], decode(encode(y, "blockwise64"), "blockwise64",
                                                                            torch.float32, [4, 256]))  # fmt: skip
    averaged = [WireCodecs.decompress(*codecs.compress(Message("avg", RUN, tensors=[y]), request=False),
                                      MessageLimits()).tensors[0] for _ in range(2)]  # fmt: skip
    assert not torch.equal(averaged[0], averaged[1])  # stochastic: two roundings of the same tensor differ


def test_stochastic_rounding_is_unbiased() -> None:
    x = torch.full((BLOCK,), 0.3)
    x[0] = 1.0  # the block's absmax: a step of 1/127, and 0.3 falls between two steps
    g = torch.Generator().manual_seed(1)
    mean = sum(decode(encode(x, "blockwise8", True, g), "blockwise8", torch.float32, [BLOCK]) for _ in range(200)) / 200
    nearest = decode(encode(x, "blockwise8"), "blockwise8", torch.float32, [BLOCK])
    assert abs(float(mean[1:].mean()) - 0.3) < 2e-4 < abs(float(nearest[1]) - 0.3)


def test_error_feedback_sends_what_was_meant_over_time() -> None:
    codecs = WireCodecs()
    codecs.use(WireConfig(averaging="uint8"))
    g = torch.Generator().manual_seed(2)
    meant_total, sent_total = torch.zeros(4096), torch.zeros(4096)
    for _ in range(20):
        grad = torch.randn(4096, generator=g)
        sent, entries = codecs.compress(Message("avg", RUN, tensors=[grad]), request=True)
        got = WireCodecs.decompress(sent, entries, MessageLimits())
        meant_total += grad
        sent_total += got.tensors[0]
    one_step_error = (decode(encode(grad, "uint8"), "uint8", torch.float32, [4096]) - grad).abs().max()
    assert float((meant_total - sent_total).abs().max()) <= float(one_step_error) * 1.5  # does not pile up


def test_codecs_header_is_checked_before_decoding() -> None:
    x = _activations(BLOCK)
    codecs = WireCodecs()
    codecs.use(WireConfig(activations="blockwise8"))
    sent, entries = codecs.compress(Message("forward", RUN, tensors=[x, torch.ones(3)]), request=True)
    assert entries[1] is None and len(sent.tensors) == 3  # the small tensor travels as it is
    limits = MessageLimits()
    bomb = [["blockwise8", "float32", [1 << 40]], None]  # 4 TB declared: refused before any decoding
    bad = [["blockwise8", "float32", [BLOCK + 1]], None]  # parts that do not fit the shape
    for wrong in (bomb, bad, [["zip", "float32", [BLOCK]], None], "x", [None]):
        with pytest.raises(BadMessage):
            WireCodecs.decompress(Message("forward", RUN, tensors=list(sent.tensors)), wrong, limits)
    back = WireCodecs.decompress(sent, entries, limits)
    assert back.tensors[0].shape == x.shape and torch.equal(back.tensors[1], torch.ones(3))


def test_codec_fidelity_measures_each_direction_against_the_exact_step() -> None:
    """benchmarks.codec_fidelity on the debug model: the exact step against itself bends nothing; bf16 bends the
    gradient less than uniform 8-bit (which clips past 3 sigma), in both directions."""
    from gwtf.benchmarks.codec_fidelity import measure
    from gwtf.models.presets import get_preset
    from gwtf.models.staged import build_stages

    torch.manual_seed(0)
    stages = build_stages(get_preset("debug", seq_len=32), seed=0)
    batch = torch.randint(0, 259, (2, 32), generator=torch.Generator().manual_seed(0))
    results = measure(stages, [batch], ["none", "bf16", "uint8"])
    assert results["none"]["forward"]["one_minus_cosine"] < 1e-12
    for way in ("forward", "backward"):
        assert 0 < results["bf16"][way]["one_minus_cosine"] < results["uint8"][way]["one_minus_cosine"], results


def test_a_swarm_with_8bit_activations_trains_and_sends_fewer_bytes() -> None:
    """8-bit activations (hivemind's uniform) and gradients (blockwise, stochastic rounding): the swarm trains, its
    loss stays near the fp32 reference's, and each activation message is about a quarter of its fp32 size."""
    from gwtf.trainer import train_local
    from tests.support import InProcessSwarm
    from tests.test_swarm_inprocess import fast_swarm, small_config

    steps = 6
    cfg = small_config(steps=steps, stages=2)
    reference = train_local(cfg, progress=False)["losses"]

    async def train() -> tuple[list[float], InProcessSwarm]:
        swarm = InProcessSwarm(cfg, settings=fast_swarm("wire.activations=uint8", "wire.gradients=blockwise8"))
        await swarm.start()
        try:
            return [(await swarm.step()).loss for _ in range(steps)], swarm
        finally:
            await swarm.close()

    losses, swarm = asyncio.run(asyncio.wait_for(train(), 100))
    assert losses[-1] < losses[0] - 0.2, losses  # it trains
    assert abs(losses[-1] - reference[-1]) < 0.05 * reference[-1], (losses[-1], reference[-1])
    data = swarm.data_nodes[0].transport
    fp32 = cfg.train.microbatch_size * swarm.spec.model.seq_len * swarm.spec.model.d_model * 4  # one activation
    forwards = steps * cfg.train.microbatches_per_step
    # a quarter, plus the 1 KiB codebook and the JSON header: 0.27 of this tiny model's 64 KiB activations
    assert data.wire["sent"]["forward"] <= 0.28 * fp32 * forwards, (data.wire["sent"]["forward"], fp32 * forwards)
    assert data.wire["received"]["head"] <= 0.28 * fp32 * forwards  # stage 2's output came back 8-bit too


def test_frames_skip_the_checksum_only_where_the_channel_authenticates() -> None:
    from gwtf.transport.frame import NO_CHECKSUM, decode_body, parse_header

    frame = encode_frame(Message("f", RUN, tensors=[torch.ones(8)]), extra={}, checksum=False)
    header = parse_header(bytes(frame[1]), sum(len(b) for b in frame[2:]))
    body = bytearray(b"".join(bytes(b) for b in frame[2:]))
    assert header.crc == NO_CHECKSUM
    with pytest.raises(BadMessage, match="without a checksum"):
        decode_body(header, body, "peer", authenticated=False)  # a plain socket, in-process bytes
    assert torch.equal(decode_body(header, body, "peer", authenticated=True).tensors[0], torch.ones(8))

    async def run() -> None:
        for encrypt in (True, False):
            client, server = await hivemind_pair(encrypt=encrypt)
            try:
                assert not client._authenticated_path(server.peer_id)  # its endpoint is not known yet: checksum
                await _still_serves(client, server)
                assert client._authenticated_path(server.peer_id) == encrypt  # sealed: the AEAD covers it
                await _still_serves(client, server)
            finally:
                await close_all(client, server)

    asyncio.run(run())


@pytest.mark.parametrize("cipher", CIPHERS)
def test_each_cipher_round_trips_and_refuses_the_other(cipher: str) -> None:
    """Both AEADs a node may choose carry frames whole; keys derived for one cipher open nothing sealed by the
    other (the cipher is bound into the keys), so a caller and a server that disagree fail at the first record."""

    async def run() -> None:
        a, b = socket.socketpair()
        for s in (a, b):
            s.setblocking(False)
        up, down = derive_keys(b"k" * 32, b"s" * 32, RUN, "caller", "server", b"c" * 16, b"n" * 16, cipher)
        caller, server = SecureChannel(a, up, down, cipher=cipher), SecureChannel(b, down, up, cipher=cipher)
        payload = torch.randint(0, 256, (3 * RECORD_BYTES + 5,), dtype=torch.uint8).numpy().tobytes()
        sent = asyncio.ensure_future(caller.send([b"head", memoryview(payload)]))
        assert await server.read_exactly(4 + len(payload)) == b"head" + payload
        await sent
        a.close(), b.close()
        other = next(c for c in CIPHERS if c != cipher)
        up2, down2 = derive_keys(b"k" * 32, b"s" * 32, RUN, "caller", "server", b"c" * 16, b"n" * 16, other)
        assert (up2, down2) != (up, down)
        for keys in ((down2, up2), (down, up)):  # the other cipher's keys, or even these keys under the other cipher
            a, b = socket.socketpair()
            for s in (a, b):
                s.setblocking(False)
            await SecureChannel(a, up, down, cipher=cipher).send([b"x" * 100])  # record 0, as the reader expects
            with pytest.raises(Tampered):
                await SecureChannel(b, *keys, cipher=other).read_exactly(100)
            a.close(), b.close()

    asyncio.run(run())
