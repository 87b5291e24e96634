"""The wire protocol, fuzzed: malformed, truncated, oversized, wrong-dtype, wrong-shape, NaN/Inf, unauthenticated
and replayed frames thrown at a live swarm's relay and data node (a keyed in-process swarm between two iterations).

Every frame goes through a node's real receive path (`Transport._serve_request`) from an invited peer (it holds
the run key, so the frames get past authentication and reach the parsers and handlers). The node must answer each
with an error (a frame cut short may instead end the channel: the node cannot tell it from a slow sender), within
a bound, with its state (weights, gradients, optimizer step, held microbatches, version) unchanged; and the swarm
must train on afterwards. Bounded to GWTF_FUZZ_SECONDS (default 20 s) of fuzzing; the number of inputs tried is
printed (pytest -s).
"""

import asyncio
import math
import os
import secrets
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gwtf.auth import RunAccess
from gwtf.transport import encode_frame, is_error_frame
from gwtf.transport.channels import BytesReader
from tests.support import InProcessSwarm
from tests.test_auth import KeyedSwarm
from tests.test_swarm_inprocess import fast_swarm, small_config

RUN = "fuzz"
FUZZ_SECONDS = float(os.environ.get("GWTF_FUZZ_SECONDS", "20"))  # the fast tier; up to 60 by the issue
REPLY_TIMEOUT = 10.0
FUZZER = "fuzzer"
# handlers that may legitimately answer a well-formed request with a reply (read-only, or idempotent for a past
# iteration); everything they get must still leave the node's state unchanged
MAY_REPLY = {"get_state", "release", "end_iteration"}

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=12))
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


class Fuzz:
    def __init__(self, swarm: InProcessSwarm, loop: asyncio.AbstractEventLoop, replay: list) -> None:
        self.swarm, self.loop, self.replay = swarm, loop, replay
        self.tried = 0
        self.by_kind: dict[str, int] = {}
        self.handler_failures: set[str] = set()
        self.accepted: dict[str, int] = {}  # handler -> inputs answered without an error (allowed cases only)
        self.deadline = time.monotonic() + FUZZ_SECONDS

    def targets(self) -> dict[str, object]:
        return {**self.swarm.relays, **{d.peer_id: d for d in self.swarm.data_nodes}}

    def frame(self, target: str, handler: str, msg, proof: bool = True, run_id: str = RUN) -> bytes:
        extra = {"handler": handler, "region": None}
        if proof:
            extra["auth"] = self.swarm.access.proof(FUZZER, target)
        msg.run_id = run_id
        return b"".join(bytes(b) for b in encode_frame(msg, extra=extra))

    def send(
        self, kind: str, target: str, data: bytes, may_break: bool = False, may_reply: bool = False, handler: str = ""
    ) -> None:
        """One input: the node answers with an error (or, where allowed, a reply / a closed channel), in time."""
        node = self.targets()[target]

        async def serve():
            return await asyncio.wait_for(node.transport._serve_request(FUZZER, BytesReader(data)), REPLY_TIMEOUT)

        self.tried += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        try:
            reply = self.loop.run_until_complete(serve())
        except asyncio.IncompleteReadError:
            assert may_break, f"{kind}: the channel broke on a complete frame"
            return
        if is_error_frame(reply):
            header = bytes(reply[1])
            if b"failed:" in header:  # a handler raised something other than a refusal: a bug to report
                self.handler_failures.add(header.decode()[:160])
            return
        assert may_reply, f"{kind}: answered without an error: {bytes(reply[1])[:200]!r}"
        self.accepted[handler] = self.accepted.get(handler, 0) + 1


def snapshot(swarm: InProcessSwarm) -> dict:
    state = {}
    for name, node in swarm.relays.items():
        r = node.replica
        params = [p.detach().clone() for p in r.module.parameters()]
        grads = [None if p.grad is None else p.grad.clone() for p in r.module.parameters()]
        opt = {k: v for k, v in r.state()[1].items() if k != "lr_scale"}
        state[name] = (r.version, sorted(r.held), r.count, params, grads, opt)
    for d in swarm.data_nodes:
        state[d.peer_id] = (d.iteration, sorted(d.flights), [p.detach().clone() for p in d.stage0.module.parameters()])
    return state


def assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def record_calls(swarm: InProcessSwarm, log: list) -> None:
    for node in [*swarm.relays.values(), *swarm.data_nodes]:
        transport = node.transport
        real = transport.call

        async def call(peer, name, msg, timeout, real=real):
            log.append((peer, name, msg))
            return await real(peer, name, msg, timeout)

        transport.call = call


@pytest.fixture
def live_swarm():
    loop = asyncio.new_event_loop()
    swarm = KeyedSwarm(small_config(steps=50, stages=2), settings=fast_swarm("averaging.timeout=1.0"), run_id=RUN)
    swarm.access = RunAccess(RUN, secrets.token_bytes(32))
    replay: list = []
    try:
        loop.run_until_complete(swarm.start())
        record_calls(swarm, replay)
        loop.run_until_complete(swarm.step())  # the replay corpus: every call of a whole iteration
        for node in [*swarm.relays.values(), *swarm.data_nodes]:
            del node.transport.call
        loop.run_until_complete(swarm.step())  # so the corpus is one iteration old
        yield swarm, loop, replay
    finally:
        loop.run_until_complete(swarm.close())
        loop.close()


def test_fuzzed_frames_get_errors_and_leave_the_node_unchanged(live_swarm) -> None:
    swarm, loop, replay = live_swarm
    fuzz = Fuzz(swarm, loop, replay)
    before = snapshot(swarm)
    relay = next(iter(swarm.relays.values()))
    data = swarm.data_nodes[0]
    m = swarm.spec.model
    names = sorted({*relay.transport._handlers, *data.transport._handlers})

    def activation_msg(kind: str, tensors, iteration=None):
        route = [relay.peer_id if s == relay.stage else "x" for s in range(1, m.n_stages + 1)]
        meta = {"route": route, "origin": data.peer_id, "attempt": 0}
        it = relay.replica.version if iteration is None else iteration
        from gwtf.transport import Message

        return Message(kind, RUN, iteration=it, microbatch_id=0, stage=relay.stage - 1, tensors=tensors, meta=meta)

    gen = torch.Generator().manual_seed(0)
    valid = torch.randn(4, m.seq_len, m.d_model, generator=gen)
    good = valid.clone  # the same bytes every time: hypothesis needs frames of a reproducible length

    # batches of examples, each a fresh hypothesis run, until the time is up (a run cannot be stopped midway)
    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(draw) -> None:
        d = draw.draw
        kind = d(st.sampled_from(["garbage", "truncated", "bitflip", "oversized", "dtype_shape", "nonfinite",
                                  "meta", "unauthenticated", "replay"]))  # fmt: skip
        target = relay.peer_id
        if kind == "garbage":
            fuzz.send(kind, target, d(st.binary(max_size=256)), may_break=True)
        elif kind == "truncated":
            frame = fuzz.frame(target, "forward", activation_msg("forward", [good()]))
            cut = d(st.integers(0, len(frame) - 1))
            fuzz.send(kind, target, frame[:cut], may_break=True)
        elif kind == "bitflip":  # one byte changed anywhere past the prefix: header parse, checks, or checksum
            frame = bytearray(fuzz.frame(target, "forward", activation_msg("forward", [good()], iteration=-5)))
            pos = d(st.integers(16, len(frame) - 1))
            frame[pos] ^= d(st.integers(1, 255))
            fuzz.send(kind, target, bytes(frame), may_break=True)
        elif kind == "oversized":
            shape = d(st.lists(st.integers(1, 2**31), min_size=1, max_size=4))
            header = {"handler": d(st.sampled_from(names)), "auth": swarm.access.proof(FUZZER, target),
                      "kind": "forward", "run_id": RUN, "iteration": 0, "microbatch_id": 0, "stage": 0, "meta": {},
                      "tensors": [["float32", shape]] * d(st.integers(1, 100)), "xxh3": 0}  # fmt: skip
            raw = str(header).replace("'", '"').encode()
            body_len = d(st.integers(0, 2**40))
            fuzz.send(kind, target, struct.pack("!4sIQ", b"GWT1", len(raw), body_len) + raw, may_break=True)
        elif kind == "dtype_shape":
            dtype = d(st.sampled_from([torch.float16, torch.float64, torch.int64, torch.uint8, torch.float32]))
            shape = d(st.lists(st.integers(0, 70), min_size=0, max_size=4))
            if dtype == torch.float32 and len(shape) == 3 and shape[2] == m.d_model and shape[1] <= m.seq_len:
                shape[2] += 1  # not accidentally valid
            handler = d(st.sampled_from(["forward", "backward", "recompute"]))
            t = torch.zeros(shape).to(dtype)
            fuzz.send(kind, target, fuzz.frame(target, handler, activation_msg(handler, [t] * d(st.integers(1, 3)))))
        elif kind == "nonfinite":
            x = good()
            x.view(-1)[d(st.integers(0, x.numel() - 1))] = d(st.sampled_from([math.nan, math.inf, -math.inf]))
            handler = d(st.sampled_from(["forward", "backward", "recompute", "head", "avg_stage1", "avg_stage0"]))
            to = data.peer_id if handler in ("head", "avg_stage0") else target
            fuzz.send(kind, to, fuzz.frame(to, handler, activation_msg(handler, [x])))
        elif kind == "meta":  # well-framed, random fields, any handler of either node
            from gwtf.transport import Message

            to = d(st.sampled_from([relay.peer_id, data.peer_id]))
            handler = d(st.sampled_from([*names, "nope"]))
            iteration = d(st.integers(-3, 10) | st.integers(-(2**62), 2**62))
            if handler == "end_iteration" and iteration == relay.replica.version:
                iteration += 1  # a member ending the current iteration is the protocol, not fuzz (see report)
            msg = Message(d(st.text(max_size=10)), RUN, iteration=iteration,
                          microbatch_id=d(st.integers(-(2**62), 2**62)), stage=d(st.integers(-5, 5)),
                          tensors=d(st.sampled_from([[], [torch.zeros(2)], [good()]])),
                          meta=d(st.dictionaries(st.text(max_size=10), json_value, max_size=5)))  # fmt: skip
            # the nodes' validators key on the message's kind, which the sender picks: a kind other than the
            # handler's name skips them (see the report); such a message may be acked, and must change nothing
            foreign = msg.kind != handler
            fuzz.send(
                kind, to, fuzz.frame(to, handler, msg), may_reply=handler in MAY_REPLY or foreign, handler=handler
            )
        elif kind == "unauthenticated":
            msg = activation_msg("forward", [good()])
            variant = d(st.sampled_from(["no_proof", "other_key", "wrong_run"]))
            if variant == "no_proof":
                frame = fuzz.frame(target, "forward", msg, proof=False)
            elif variant == "other_key":
                other = RunAccess(RUN, secrets.token_bytes(32))
                frame = b"".join(bytes(b) for b in encode_frame(
                    msg, extra={"handler": "forward", "auth": other.proof(FUZZER, target)}))  # fmt: skip
            else:
                frame = fuzz.frame(target, "forward", msg, run_id="another-run")
            fuzz.send(kind, target, frame)
        else:  # a message of the previous iteration, sent again (as that sender's peer: it holds the key)
            peer, handler, msg = replay[d(st.integers(0, len(replay) - 1))]
            if peer not in fuzz.targets():
                return
            fuzz.send(kind, peer, fuzz.frame(peer, handler, msg), may_reply=handler in MAY_REPLY, handler=handler)

    while time.monotonic() < fuzz.deadline:
        one()
    after = snapshot(swarm)
    assert_same(before, after, "state")
    print(f"\nfuzz: {fuzz.tried} inputs in {FUZZ_SECONDS:.0f}s, by kind {fuzz.by_kind}")
    print(f"answered without an error (allowed: read-only, past iterations, or a foreign kind): {fuzz.accepted}")
    if fuzz.handler_failures:
        print("handlers that raised (answered as 'handler failed'):", *sorted(fuzz.handler_failures), sep="\n  ")
    assert fuzz.tried > 300 and set(fuzz.by_kind) >= {"garbage", "truncated", "nonfinite", "replay", "meta"}
    result = loop.run_until_complete(asyncio.wait_for(swarm.step(), 60))  # the swarm trains on
    assert math.isfinite(result.loss) and all(r.lost == 0 for r in result.reports)
