"""Liveness probes: a crashed peer is known at once (its DHT record outlives it), and an averaging leader does not
wait out its timeout for a member that crashed."""

import asyncio
import time

import torch

from gwtf.averaging import GroupAverager
from gwtf.liveness import Answer, gone, probe
from gwtf.transport import InProcessNetwork, InProcessTransport, Message

RUN = "r"


def test_probe_tells_up_from_gone():
    async def main() -> list[Answer]:
        net = InProcessNetwork()
        me = InProcessTransport(net, "me", RUN)
        InProcessTransport(net, "bare", RUN)  # up, but without the handler: its refusal proves it is up
        relay = InProcessTransport(net, "relay", RUN)

        async def ack(msg: Message) -> Message:
            return Message(kind="ack", run_id=RUN)

        relay.add_handler("release", ack)
        InProcessTransport(net, "crashed", RUN)
        net.crash("crashed")
        answers = [await probe(me, p) for p in ("bare", "relay", "crashed", "never-was")]
        assert await gone(me, {"bare", "relay", "crashed"}) == {"crashed"}
        return answers

    assert asyncio.run(main()) == [Answer.UP, Answer.UP, Answer.GONE, Answer.GONE]


def test_averaging_leader_does_not_wait_out_its_timeout_for_a_crashed_member():
    async def main() -> tuple[float, list[str]]:
        net = InProcessNetwork()
        a, b = (GroupAverager(InProcessTransport(net, n, RUN), RUN, "stage1", timeout=60.0) for n in ("a", "b"))
        InProcessTransport(net, "c", RUN)
        net.crash("c")  # its record would still list it: the group is a, b, c
        t0 = time.monotonic()
        grads = [torch.ones(3)]
        ra, rb = await asyncio.gather(
            a.average(0, grads, 1, ["a", "b", "c"]), b.average(0, [2 * g for g in grads], 1, ["a", "b", "c"])
        )
        assert torch.equal(ra.grads[0], rb.grads[0]) and torch.allclose(ra.grads[0], torch.full((3,), 1.5))
        return time.monotonic() - t0, ra.participants

    elapsed, participants = asyncio.run(main())
    assert sorted(participants) == ["a", "b"]
    assert elapsed < 30, f"the leader waited {elapsed:.1f}s for a crashed member (its timeout is 60 s)"


def test_probe_cache_shares_probes_between_concurrent_waits():
    from gwtf.liveness import ProbeCache, answering

    async def main() -> None:
        net = InProcessNetwork()
        me = InProcessTransport(net, "me", RUN)
        calls: list[str] = []

        async def ack(msg: Message) -> Message:
            calls.append("relay")
            await asyncio.sleep(0.05)  # in flight while the other waits ask
            return Message(kind="ack", run_id=RUN)

        InProcessTransport(net, "relay", RUN).add_handler("release", ack)
        InProcessTransport(net, "crashed", RUN)
        net.crash("crashed")
        cache = ProbeCache(me, ttl=0.5)
        # ten late legs over the same two replicas probe them at once: one probe each goes out
        results = await asyncio.gather(*(cache.gone({"relay", "crashed"}) for _ in range(10)))
        assert all(r == {"crashed"} for r in results)
        assert cache.sent == 2 and calls == ["relay"]
        assert await cache.gone({"relay"}) == set() and cache.sent == 2  # within the ttl: the answer is reused
        await asyncio.sleep(0.55)
        assert await cache.gone({"relay"}) == set() and cache.sent == 3  # after it: asked again
        # a joiner counts only the peers that answer
        assert await answering(me, {"relay", "crashed", "never-was"}) == {"relay"}

    asyncio.run(main())


class FlakyTransport(InProcessTransport):
    """Its first `breaks` calls fail as a reset connection does, though the peer is there."""

    def __init__(self, *args, breaks: int = 1, **kw):
        super().__init__(*args, **kw)
        self.breaks = breaks

    async def _call_frame(self, peer_id, frame, nbytes):
        if self.breaks > 0:
            self.breaks -= 1
            raise ConnectionResetError("connection reset by peer")
        return await super()._call_frame(peer_id, frame, nbytes)


def test_one_broken_connection_neither_looks_gone_nor_splits_an_averaging_round():
    """Regression (a CI run of a 2x2 process swarm): the member's push to a live leader broke once; it led a round
    of its own, its probe of the leader broke too and called it gone, and the two replicas of the stage stepped
    different gradients from then on."""

    async def main():
        net = InProcessNetwork()
        lead = GroupAverager(InProcessTransport(net, "a", RUN), RUN, "stage1", timeout=5.0)
        member = GroupAverager(FlakyTransport(net, "b", RUN, breaks=1), RUN, "stage1", timeout=5.0)
        assert await probe(FlakyTransport(net, "p", RUN, breaks=1), "a") is Answer.UP  # re-checked, not gone
        grads = [torch.ones(3)]
        return await asyncio.gather(
            lead.average(0, grads, 1, ["a", "b"]), member.average(0, [3 * grads[0]], 1, ["a", "b"])
        )

    ra, rb = asyncio.run(main())
    assert sorted(ra.participants) == sorted(rb.participants) == ["a", "b"]
    assert torch.equal(ra.grads[0], rb.grads[0]) and torch.allclose(ra.grads[0], torch.full((3,), 2.0))


def test_an_idle_direct_tcp_connection_the_peer_closed_is_not_reused():
    import socket

    from gwtf.transport.direct import _dropped

    mine, theirs = socket.socketpair()
    mine.setblocking(False)
    assert not _dropped(mine)  # open, nothing to read
    theirs.close()
    assert _dropped(mine)  # the peer's FIN: a request sent on it would vanish
    mine.close()


def test_a_reset_first_contact_is_asked_again():
    """The first stream between two peers (asking for the direct-TCP endpoint) can be reset by a libp2p dial race;
    asking is idempotent, so it is asked once more before the call counts as failed. A second failure counts."""
    from gwtf.errors import PeerError
    from gwtf.transport.direct import _HANDLE_BYTES, DirectTcp, Endpoint

    async def main(fails: int):
        asked = []

        async def ask(peer):
            asked.append(peer)
            if len(asked) <= fails:
                raise asyncio.IncompleteReadError(b"", 16)
            return {
                "hosts": ["127.0.0.1"],
                "port": 9,
                "handle": "00" * _HANDLE_BYTES,
                "secret": "11" * 32,
                "cipher": "none",
            }

        direct = DirectTcp("me", serve=None, read_reply=None, ask_endpoint=ask)  # type: ignore[arg-type]
        try:
            return await direct.endpoint("peer"), len(asked)
        except (PeerError, asyncio.IncompleteReadError) as exc:
            return type(exc).__name__, len(asked)

    granted = Endpoint(("127.0.0.1",), 9, bytes(_HANDLE_BYTES), bytes.fromhex("11" * 32), "none")
    assert asyncio.run(main(fails=1)) == (granted, 2)
    assert asyncio.run(main(fails=2)) == ("IncompleteReadError", 2)
