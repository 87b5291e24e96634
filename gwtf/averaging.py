"""Same-stage gradient averaging, weighted by the microbatches each replica processed; poisoned updates left out.

Every member of a group (the live replicas of one stage, or the data nodes for stage 0) holds an unscaled
gradient sum and a count. The member with the lowest peer id leads: the others push (sum, count) to it, it waits
for the members it expects (bounded by a timeout, then goes on without the missing ones), reduces in peer-id order
and answers every push with the same tensors, so all replicas step identical gradients and keep identical weights.
A leader that dies is skipped: pushers move on to the next lowest id. A late push gets the finished result (its own
contribution left out, its weights still in agreement).

Poisoning (`AveragingConfig`): before reducing, the leader leaves out a contribution whose gradients are not finite,
have other shapes than its own, or whose scaled norm (norm of the sum / sqrt(count): the sum of k noisy
microbatch gradients grows like sqrt(k), so replicas that processed different numbers compare fairly) is over
`norm_factor` times the stage's recent range (the low median of the accepted scaled norms of the last rounds,
which every member keeps from the results, so a new leader knows it too). The peer id is logged, the contributor
still gets the result and stays in agreement. A member whose own gradients are not finite withholds them (the
transport would refuse a NaN anyway).
Optionally the reduce itself is robust: a coordinate-wise median or trimmed mean of the per-microbatch gradients,
weighted by microbatch counts. What this cannot catch: a member sending wrong gradients of a normal size.

Buckets: a push is the stage's gradients flattened into one fp32 vector and cut into buckets of at most
`bucket_mb` MiB, one message each (as torch DDP buckets its all-reduce), sent at once; the leader reduces once it
holds every bucket of a member and answers each push with the same bucket of the result. A stage of any number of
tensors averages (a message carries at most 64 tensors: an 8-layer LLaMA stage has 72), and no message grows with
the model. The members' layouts (every tensor's shape and dtype, hashed) must match the leader's. Every wait grows
with the bytes it waits for, over the run's floor bandwidth (gwtf.sizing).

Why not hivemind's DecentralizedAverager: its all-reduce splits tensors into parts reduced by different peers, so
replicas end up with results that differ in the last bits, and its matchmaking costs seconds per round. Stage groups
here are small (a few replicas), and exact agreement is what lets a joiner or a CheckFree neighbour trust any
replica's state, so a leader reduce over the same transport as the activations is simpler and exact.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from gwtf.errors import BadMessage, PeerError, UserError
from gwtf.liveness import Answer, gone, probe
from gwtf.sizing import MIB, tensor_bytes, transfer_s
from gwtf.transport import Message, Transport

log = logging.getLogger(__name__)

AGGREGATES = ("mean", "median", "trimmed_mean")
PROBE_AFTER_S = 0.5  # a leader still missing contributions after this asks the missing members if they are there
MAX_BUCKETS = 1 << 16  # a push announcing more buckets than this is refused (64 TiB at the largest bucket size)
DEFAULT_FLOOR_MBPS = 50.0  # the floor bandwidth when the caller gives none (gwtf.runtime.config.IterationConfig)
Contribution = tuple[list[torch.Tensor], int]  # (flat fp32 buckets, microbatch count); ([], 0): nothing to add


@dataclass
class AveragingConfig:
    """How long a stage's averaging round waits, and how its leader screens and reduces contributions
    (`[averaging]` in a run config)."""

    timeout: float = 10.0  # seconds a leader waits for the members it expects, then goes on without the missing
    screen: bool = True  # leave out non-finite, misshapen and far-too-large contributions
    # "far too large": a scaled norm over this times the recent range. Honest replicas of the debug model differ by
    # up to ~11x within a round (few microbatches each, loss spikes); poison worth the name is 1000x.
    norm_factor: float = 30.0
    history: int = 32  # accepted scaled norms kept as the recent range
    min_history: int = 3  # below this many, the round's own contributions are the range
    aggregate: str = "mean"  # mean (exact, weighted by counts) | median | trimmed_mean (coordinate-wise)
    trim: float = 0.2  # trimmed_mean: the fraction of contributions cut at each end, per coordinate
    bucket_mb: float = 32.0  # MiB of flattened fp32 gradients per averaging message

    def __post_init__(self) -> None:
        if not 0.0 < self.bucket_mb <= 1024.0:  # a message's tensor is at most 1 GiB (MessageLimits)
            raise UserError(f"averaging.bucket_mb={self.bucket_mb} must be in (0, 1024] (MiB)")
        if not self.timeout > 0:
            raise UserError(f"averaging.timeout={self.timeout} must be positive (seconds)")
        if self.aggregate not in AGGREGATES:
            raise UserError(f"averaging.aggregate={self.aggregate!r} is unknown; choose one of {AGGREGATES}")
        if self.norm_factor <= 1.0:
            raise UserError(f"averaging.norm_factor={self.norm_factor} must exceed 1")
        if not 0.0 <= self.trim < 0.5:
            raise UserError(f"averaging.trim={self.trim} must be in [0, 0.5)")
        if self.history < 1 or self.min_history < 1:
            raise UserError(
                f"averaging.history={self.history} and averaging.min_history={self.min_history} must be >= 1"
            )


@dataclass
class Buckets:
    """A member's gradients flattened to fp32 and cut into buckets of at most `bucket_numel` elements, with the
    layout (shapes and dtypes) that puts them back."""

    tensors: list[torch.Tensor]  # 1-D fp32 views of one flat vector
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    layout: str  # a hash of shapes and dtypes: members of one stage have the same

    @classmethod
    def of(cls, grads: list[torch.Tensor], bucket_bytes: int) -> Buckets:
        shapes, dtypes = [tuple(g.shape) for g in grads], [g.dtype for g in grads]
        flat = torch.cat([g.detach().reshape(-1).to(torch.float32) for g in grads]) if grads else torch.zeros(0)
        numel = max(1, bucket_bytes // flat.element_size())
        return cls(list(flat.split(numel)) if flat.numel() else [], shapes, dtypes, layout_hash(shapes, dtypes))

    def unflatten(self, buckets: list[torch.Tensor]) -> list[torch.Tensor]:
        """`buckets` (a result in this layout) as tensors shaped like the member's gradients; a result of another
        size (this member's layout is not the leader's) comes back flat, as one tensor."""
        flat = torch.cat(buckets) if buckets else torch.zeros(0)
        sizes = [math.prod(s) for s in self.shapes]
        if flat.numel() != sum(sizes):
            return [flat]
        parts = flat.split(sizes)
        return [p.view(s).to(d) for p, s, d in zip(parts, self.shapes, self.dtypes)]


def layout_hash(shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> str:
    text = ";".join(f"{s}:{d}" for s, d in zip(shapes, dtypes))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass
class _Round:
    contributions: dict[str, Contribution] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)  # member -> the layout its buckets came in
    partial: dict[str, dict[int, torch.Tensor | None]] = field(default_factory=dict)  # buckets of a push so far
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    result: asyncio.Future | None = None


@dataclass
class AverageResult:
    grads: list[torch.Tensor]  # shaped like the member's gradients (inside a round: the flat buckets)
    total_count: int
    participants: list[str]
    left_out: dict[str, str] = field(default_factory=dict)  # peer -> why its contribution was left out
    norms: list[float] = field(default_factory=list)  # accepted scaled norms (the recent range)


class GroupAverager:
    """Leader reduce of (gradient sum, count) among a group of peers over the node's transport."""

    def __init__(
        self,
        transport: Transport,
        run_id: str,
        group: str,
        timeout: float | None = None,
        keep_rounds: int = 4,
        config: AveragingConfig | None = None,
        floor_mbps: float = DEFAULT_FLOOR_MBPS,
    ):
        self.config = config or AveragingConfig()
        self.transport, self.run_id, self.group = transport, run_id, group
        self.timeout = self.config.timeout if timeout is None else timeout
        self.floor_mbps = floor_mbps
        self.bucket_bytes = int(self.config.bucket_mb * MIB)
        self.keep_rounds = keep_rounds
        self.rounds: dict[int, _Round] = {}
        self.finished = -1  # the latest round this peer led to its end
        self.norm_history: collections.deque[float] = collections.deque(maxlen=self.config.history)
        transport.add_handler(f"avg_{group}", self._rpc_push)

    def _round(self, iteration: int) -> _Round:
        if iteration not in self.rounds:
            self.rounds[iteration] = _Round(result=asyncio.get_running_loop().create_future())
            for old in sorted(self.rounds)[: -self.keep_rounds]:
                del self.rounds[old]
        return self.rounds[iteration]

    async def average(self, iteration: int, grads: list[torch.Tensor], count: int, members: list[str]) -> AverageResult:
        """Average with `members` (this peer included or not); returns the same result on every member."""
        candidates = sorted(set(members) | {self.transport.peer_id})
        mine = Buckets.of(grads, self.bucket_bytes)
        withheld = self.config.screen and not all(_finite(g) for g in grads)
        if withheld:
            log.warning("%s round %d: this replica's gradients are not finite; withheld", self.group, iteration)
        for leader in candidates:  # bounded: each failed leader is skipped once
            if leader == self.transport.peer_id:
                result = await self._lead(iteration, mine, count, candidates)
            else:
                try:
                    result = await self._push_to(leader, iteration, mine, 0 if withheld else count, withheld)
                except PeerError as exc:
                    log.warning(
                        "%s averaging round %d: leader %s failed (%s); next one", self.group, iteration, leader, exc
                    )
                    continue
            self.norm_history.extend(result.norms)
            # a copy: the round's result (flat buckets) still answers late pushes
            return dataclasses.replace(result, grads=mine.unflatten(result.grads))
        raise PeerError(f"{self.group} averaging round {iteration}: no leader answered")

    def wait_s(self, nbytes: int) -> float:
        """The fixed wait plus `nbytes` at the floor bandwidth."""
        return self.timeout + transfer_s(nbytes, self.floor_mbps)

    async def _push_to(self, leader: str, iteration: int, mine: Buckets, count: int, withheld: bool) -> AverageResult:
        """Push to `leader`; a connection that broke (not a refusal, not a timeout) is tried once more unless a probe
        finds the leader gone: skipping a live leader would split the stage into two rounds, and its replicas would
        step different gradients from then on (a CI run saw one reset connection do exactly that)."""
        try:
            return await self._push(leader, iteration, mine, count, withheld)
        except PeerError as exc:
            if (
                not str(exc).startswith("unreachable")
                or await probe(self.transport, leader, PROBE_AFTER_S) is Answer.GONE
            ):
                raise
            log.info("%s averaging round %d: leader %s: %s; not gone by a probe, pushing again", self.group, iteration,
                     leader, exc)  # fmt: skip
            return await self._push(leader, iteration, mine, count, withheld)

    async def _push(self, leader: str, iteration: int, mine: Buckets, count: int, withheld: bool) -> AverageResult:
        """Every bucket at once, each its own call; a withheld push sends the same calls without tensors (its
        member still needs every bucket of the result). One failed call fails the push."""
        n = len(mine.tensors)
        msgs = [
            Message(kind="avg", run_id=self.run_id, iteration=iteration, tensors=[] if withheld else [b],
                    meta={"count": count, "bucket": j, "buckets": n, "layout": mine.layout})
            for j, b in enumerate(mine.tensors)
        ]  # fmt: skip
        # The buckets share the link both ways, and the leader may wait its own timeout for the others first.
        timeout = 2 * self.wait_s(2 * tensor_bytes(mine.tensors))
        calls = [asyncio.ensure_future(self.transport.call(leader, f"avg_{self.group}", m, timeout)) for m in msgs]
        try:
            replies = await asyncio.gather(*calls)
        finally:
            for c in calls:
                c.cancel()  # the others of a failed push: the caller moves on to the next leader
        if not replies:
            return AverageResult([], 0, [])
        meta = replies[0].meta
        norms = meta.get("norms", [])
        if not isinstance(norms, list) or not all(isinstance(n, float) and math.isfinite(n) for n in norms):
            norms = []  # a malformed range only costs this member its history
        left_out = meta.get("left_out", {})
        return AverageResult(
            [t for r in replies for t in r.tensors],
            int(meta["total_count"]),
            list(meta["participants"]),
            left_out if isinstance(left_out, dict) else {},
            norms,
        )

    async def _lead(self, iteration: int, mine: Buckets, count: int, members: list[str]) -> AverageResult:
        rnd = self._round(iteration)
        rnd.contributions[self.transport.peer_id] = (mine.tensors, count)
        rnd.layouts[self.transport.peer_id] = mine.layout
        # Every other member's buckets come in over this leader's link.
        deadline = time.monotonic() + self.wait_s((len(members) - 1) * tensor_bytes(mine.tensors))
        expected, next_probe = set(members), time.monotonic() + PROBE_AFTER_S
        while not expected <= set(rnd.contributions) and time.monotonic() < deadline:
            rnd.arrived.clear()
            with contextlib.suppress(TimeoutError):
                wait = min(deadline, next_probe) - time.monotonic()
                await asyncio.wait_for(rnd.arrived.wait(), timeout=max(0.0, wait))
            if time.monotonic() >= next_probe:  # a crashed member would hold the round to its timeout: ask
                dead = await gone(self.transport, expected - set(rnd.contributions), PROBE_AFTER_S)
                if dead:
                    log.info("%s averaging round %d: %s do not answer; not waiting for them", self.group, iteration,
                             sorted(dead))  # fmt: skip
                expected -= dead
                next_probe = time.monotonic() + PROBE_AFTER_S
        missing = sorted(set(members) - set(rnd.contributions))
        if missing:
            log.warning("%s averaging round %d: going on without %s", self.group, iteration, missing)
        kept, left_out, norms = self._screen(rnd, mine.layout)
        for peer, why in left_out.items():
            log.warning("%s averaging round %d: left out %s: %s", self.group, iteration, peer, why)
        result = _reduce(kept, mine.tensors, self.config)
        result.left_out, result.norms = left_out, norms
        assert rnd.result is not None
        rnd.result.set_result(result)
        self.finished = max(self.finished, iteration)
        return result

    def _screen(self, rnd: _Round, layout: str) -> tuple[dict[str, Contribution], dict[str, str], list[float]]:
        """(kept contributions, left out with the reason, the kept scaled norms)."""
        kept, left_out, norms = {}, {}, {}
        shapes = [tuple(t.shape) for t in rnd.contributions[self.transport.peer_id][0]]
        for peer, (g, count) in rnd.contributions.items():
            if count == 0 or not g:
                continue  # nothing to add (no microbatches, or withheld)
            if rnd.layouts.get(peer) != layout or [tuple(t.shape) for t in g] != shapes:
                left_out[peer] = "gradients of other shapes"
            elif self.config.screen and not all(_finite(t) for t in g):
                left_out[peer] = "non-finite gradients"
            else:
                kept[peer] = (g, count)
                norms[peer] = _norm(g) / math.sqrt(count)
        if self.config.screen and norms:
            for peer, why in self._outliers(norms).items():
                left_out[peer] = why
                del kept[peer], norms[peer]
        return kept, left_out, [norms[p] for p in sorted(norms)]

    def _outliers(self, norms: dict[str, float]) -> dict[str, str]:
        """Contributions whose scaled norm is over norm_factor x the reference (the recent range's low
        median, or this round's before there is a history). If that would leave out every contribution, the whole
        stage moved: up to norm_factor**2 x the reference it is taken as a real change, beyond it as poison."""
        factor = self.config.norm_factor
        history = list(self.norm_history)
        reference = _low_median(history if len(history) >= self.config.min_history else list(norms.values()))
        if reference <= 0.0:
            return {}
        out = {p: f"scaled gradient norm {n:.3g} over {factor:g} x the stage's {reference:.3g}"
               for p, n in norms.items() if n > factor * reference}  # fmt: skip
        if len(out) == len(norms) and min(norms.values()) <= factor**2 * reference:
            return {}
        return out

    async def _rpc_push(self, msg: Message) -> Message:
        if msg.iteration not in self.rounds and msg.iteration <= self.finished:
            raise BadMessage(f"averaging round {msg.iteration} is over (latest {self.finished})")
        if self.finished >= 0 and msg.iteration > self.finished + self.keep_rounds:
            raise BadMessage(f"averaging round {msg.iteration} is too far ahead of {self.finished}")
        count, bucket, n, layout = (msg.meta.get(k) for k in ("count", "bucket", "buckets", "layout"))
        if not isinstance(count, int) or not _natural(count):
            raise BadMessage(f"averaging push needs a non-negative integer count, got {count!r}")
        if not (isinstance(n, int) and isinstance(bucket, int) and _natural(bucket) and bucket < n <= MAX_BUCKETS
                and isinstance(layout, str)):  # fmt: skip
            raise BadMessage(f"averaging push: bucket {bucket!r} of {n!r} (layout {layout!r}) is malformed")
        if len(msg.tensors) > 1 or (msg.tensors and msg.tensors[0].dim() != 1):
            raise BadMessage("an averaging push carries one flat bucket or none")
        rnd = self._round(msg.iteration)
        assert rnd.result is not None
        if not rnd.result.done():
            self._add_bucket(rnd, msg.sender, bucket, n, layout, msg.tensors[0] if msg.tensors else None, count)
        wait = 2 * self.wait_s(2 * n * self.bucket_bytes)
        result: AverageResult = await asyncio.wait_for(asyncio.shield(rnd.result), timeout=wait)
        if bucket >= len(result.grads):
            raise BadMessage(f"averaging round {msg.iteration} has {len(result.grads)} buckets, not {bucket + 1}")
        meta = {
            "total_count": result.total_count,
            "participants": result.participants,
            "left_out": result.left_out,
            "norms": result.norms,
        }
        reply = [result.grads[bucket]]
        return Message(kind="avg", run_id=self.run_id, iteration=msg.iteration, tensors=reply, meta=meta)

    @staticmethod
    def _add_bucket(rnd: _Round, sender: str, bucket: int, n: int, layout: str, t: torch.Tensor | None, count: int):
        """Keep one bucket of a member's push; with its last bucket the member's contribution is complete (a push
        without tensors, or one that stopped carrying them, is a withheld one: nothing to add)."""
        got = rnd.partial.setdefault(sender, {})
        got[bucket] = t
        if len(got) < n or sender in rnd.contributions:
            return
        parts = [got[j] for j in range(n)]
        tensors = [p for p in parts if p is not None]
        rnd.contributions[sender] = (tensors, count) if len(tensors) == n else ([], 0)
        rnd.layouts[sender] = layout
        del rnd.partial[sender]
        rnd.arrived.set()


def _natural(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _finite(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def _norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(g.double()) ** 2) for g in grads))


def _low_median(values: list[float]) -> float:
    """The lower middle value: of [honest, poisoned] it picks the honest one."""
    return sorted(values)[(len(values) - 1) // 2] if values else 0.0


def _reduce(contributions: dict[str, Contribution], like: list[torch.Tensor], cfg: AveragingConfig) -> AverageResult:
    """The kept contributions reduced (zeros shaped `like` if none is left), in peer-id order so the result does
    not depend on arrival order."""
    peers = sorted(contributions)
    total = sum(contributions[p][1] for p in peers)
    if not peers:
        return AverageResult([torch.zeros_like(t) for t in like], 0, [])
    if cfg.aggregate == "mean" or len(peers) < 3:  # a median of two is their mean; trimming two leaves nothing
        sums = [torch.zeros_like(t) for t in like]
        for p in peers:
            for acc, g in zip(sums, contributions[p][0]):
                acc.add_(g)
        scale = 1.0 / max(total, 1)
        return AverageResult([s.mul_(scale) for s in sums], total, peers)
    counts = torch.tensor([float(contributions[p][1]) for p in peers], dtype=torch.float64)
    grads = []
    for i, t in enumerate(like):
        means = torch.stack([contributions[p][0][i].double() / contributions[p][1] for p in peers])  # (peers, ...)
        grads.append(_robust(means, counts, cfg).to(t.dtype))
    return AverageResult(grads, total, peers)


def _robust(means: torch.Tensor, counts: torch.Tensor, cfg: AveragingConfig) -> torch.Tensor:
    """Coordinate-wise weighted median or trimmed mean over the first axis (contributions weighted by counts)."""
    values, order = torch.sort(means, dim=0)
    weights = counts[order.reshape(len(counts), -1)].reshape(order.shape)  # each coordinate's sorted weights
    if cfg.aggregate == "median":
        cum = weights.cumsum(0)
        first = (cum >= cum[-1:] / 2).to(torch.int64).argmax(0, keepdim=True)  # first past half the weight
        return values.gather(0, first).squeeze(0)
    cut = int(cfg.trim * len(counts))
    if cut:
        weights[:cut] = 0.0
        weights[-cut:] = 0.0
    return (values * weights).sum(0) / weights.sum(0)
