"""Poisoned updates are contained: non-finite and far-too-large contributions are left out of averaging rounds;
robust aggregation (coordinate-wise median, trimmed mean) by config."""

import asyncio
import logging
import math

import pytest
import torch

from gwtf.averaging import AveragingConfig, GroupAverager
from gwtf.errors import UserError
from gwtf.transport import InProcessNetwork, InProcessTransport
from tests.test_swarm_inprocess import assert_replicas_agree, run, small_config, train_swarm

RUN = "poison"


def averagers(names: list[str], config: AveragingConfig | None = None) -> list[GroupAverager]:
    net = InProcessNetwork()
    return [GroupAverager(InProcessTransport(net, n, RUN), RUN, "stage1", timeout=5.0, config=config) for n in names]


async def one_round(avgs: list[GroupAverager], grads: dict[str, list[torch.Tensor]], counts: dict[str, int], i=0):
    members = [a.transport.peer_id for a in avgs]
    return await asyncio.gather(
        *(a.average(i, grads[a.transport.peer_id], counts[a.transport.peer_id], members) for a in avgs)
    )


def test_nan_and_x1000_contributions_are_left_out_and_everyone_agrees(caplog) -> None:
    torch.manual_seed(0)
    honest = {"b": [torch.randn(5, 3), torch.randn(3)], "d": [torch.randn(5, 3), torch.randn(3)]}
    grads = {
        "a-nan": [torch.full((5, 3), math.nan), torch.zeros(3)],  # the leader (lowest id) poisons itself
        "b": honest["b"],
        "c-big": [g * 1000 for g in honest["d"]],
        "d": honest["d"],
    }
    counts = {"a-nan": 2, "b": 2, "c-big": 2, "d": 2}
    with caplog.at_level(logging.WARNING):
        results = asyncio.run(one_round(averagers(sorted(grads)), grads, counts))
    expected = [(x + y) / 4 for x, y in zip(honest["b"], honest["d"])]
    for r in results:
        assert r.participants == ["b", "d"] and r.total_count == 4
        assert all(torch.allclose(g, e) for g, e in zip(r.grads, expected))
        assert all(torch.equal(g, h) for g, h in zip(r.grads, results[0].grads))  # bit-identical on every member
        assert set(r.left_out) == {"a-nan", "c-big"}
    assert "left out c-big" in caplog.text and "left out a-nan: non-finite" in caplog.text


def test_a_lone_replica_jumping_x1000_is_left_out_by_the_stage_history() -> None:
    async def main():
        (avg,) = averagers(["solo"])
        for i in range(4):  # a normal history
            r = await avg.average(i, [torch.ones(4) * (1 + 0.1 * i)], 1, ["solo"])
            assert r.participants == ["solo"]
        r = await avg.average(4, [torch.ones(4) * 1000], 1, ["solo"])
        assert r.participants == [] and torch.equal(r.grads[0], torch.zeros(4)) and "solo" in r.left_out
        r = await avg.average(5, [torch.ones(4) * 5], 1, ["solo"])  # 5x: a real change, within the factor
        assert r.participants == ["solo"]

    asyncio.run(main())


def test_misshapen_contribution_does_not_break_the_round() -> None:
    grads = {"a": [torch.ones(3)], "b": [torch.ones(4)], "c": [torch.ones(3) * 3]}
    results = asyncio.run(one_round(averagers(sorted(grads)), grads, {"a": 1, "b": 1, "c": 1}))
    for r in results:
        assert r.participants == ["a", "c"] and torch.equal(r.grads[0], torch.full((3,), 2.0))
        assert r.left_out == {"b": "gradients of other shapes"}


@pytest.mark.parametrize(
    "aggregate, expected",
    [("mean", (1 * 1 + 2 * 2 + 3 * 1 + 100 * 1) / 5), ("median", 2.0), ("trimmed_mean", (2 * 2 + 3 * 1) / 3)],
)
def test_robust_aggregation_weighted_by_counts(aggregate: str, expected: float) -> None:
    # per-microbatch means 1, 2, 3, 100 with counts 1, 2, 1, 1 (sums are mean x count); 100 is in range for the
    # screen (factor 1000) so that only the aggregation decides
    cfg = AveragingConfig(aggregate=aggregate, norm_factor=1000.0, trim=0.25)
    means, counts = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 100.0}, {"a": 1, "b": 2, "c": 1, "d": 1}
    grads = {p: [torch.full((2,), m * counts[p])] for p, m in means.items()}
    results = asyncio.run(one_round(averagers(sorted(grads), cfg), grads, counts))
    for r in results:
        assert r.grads[0] == pytest.approx(torch.full((2,), expected)), aggregate
    with pytest.raises(UserError, match="aggregate"):
        AveragingConfig(aggregate="mode")


def test_swarm_trains_with_a_nan_replica_and_a_x1000_replica(caplog) -> None:
    """Stage 1's leader sends NaN gradients, a stage-2 replica x1000: the others stay finite and keep training."""
    poison = {"relay-s1-1": lambda g: torch.full_like(g, math.nan), "relay-s2-4": lambda g: g * 1000}

    async def poison_at_start(step, swarm):
        if step == 0:
            for name, fn in poison.items():
                replica = swarm.relays[name].replica
                clean = replica.grad_tensors
                replica.grad_tensors = lambda clean=clean, fn=fn: [fn(g) for g in clean()]

    with caplog.at_level(logging.WARNING, logger="gwtf.averaging"):
        losses, swarm = run(train_swarm(small_config(steps=12, stages=2), 12, on_step=poison_at_start, replicas=2))
    for node in swarm.relays.values():
        assert all(torch.isfinite(p).all() for p in node.replica.module.parameters()), node.peer_id
    assert_replicas_agree(swarm)
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # the loss keeps falling
    assert caplog.text.count("left out relay-s1-1: non-finite") >= 10
    assert caplog.text.count("left out relay-s2-4: scaled gradient norm") >= 10
