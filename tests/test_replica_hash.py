"""Replicas identical, checked: each `stepped` reply carries a hash of the replica's weights, and a replica off its
stage's majority is detected and resynchronised from a majority replica; stage 0, one replica per data node, is
checked across the data nodes the same way."""

import logging

import torch

from gwtf.launch.local_swarm import replica_agreement
from gwtf.runtime.consistency import diverged, majority, weight_hashes
from gwtf.transport import Message
from tests.support import InProcessSwarm
from tests.test_swarm_inprocess import fast_swarm, run, small_config, train_swarm


def test_majority_and_the_tie_rule() -> None:
    assert majority({"a": "x", "b": "y", "c": "y"}) == "y"
    assert majority({"b": "y", "a": "x"}) == "x"  # a tie: the lowest peer id's (the averaging leader's)
    odd = diverged({"a": (1, "x"), "b": (1, "y"), "c": (1, "y"), "d": (2, "z"), "e": (2, "z")})
    assert odd == {"a": ("y", ["b", "c"])}


def test_a_replica_forced_out_of_sync_is_detected_and_resynced(caplog) -> None:
    """relay-s1-1 (the lowest id: its stage's averaging leader) gets its weights nudged before step 1; its two
    peers outvote it after that step, it downloads their state, and the stage agrees again (train_swarm asserts
    every stage's replicas bit-identical after every step)."""
    nudged = "relay-s1-1"

    async def nudge(step, swarm):
        if step == 1:
            replica = swarm.relays[nudged].replica
            with torch.no_grad():
                next(replica.module.parameters()).add_(1e-3)
        if step == 2:
            digests = {n.replica.weights_digest() for n in swarm.relays.values() if n.stage == 1}
            assert len(digests) == 1

    with caplog.at_level(logging.INFO):
        _, swarm = run(train_swarm(small_config(steps=3, stages=2), 3, on_step=nudge, replicas=[3, 1]))
    assert f"replica {nudged[:8]} has weights" in caplog.text and "resyncing" in caplog.text
    assert "resynced from" in caplog.text
    assert caplog.text.count("resyncing") == 1  # only the nudged one, only once


def test_each_step_s_weight_agreement_is_counted_for_the_run_summary() -> None:
    """The data node's iteration line counts, per stage, the replicas that reported their weights after stepping and
    the distinct hashes among them (a stale reply, of another version, is not counted); the run's summary counts
    the (step, stage) pairs compared and those that differed."""

    def stepped(version: int, digest: str) -> Message:
        return Message(kind="stepped", run_id="r", iteration=version - 1, meta={"version": version, "hash": digest})

    replies = {
        "a": stepped(4, "x"),
        "b": stepped(4, "x"),
        "c": stepped(4, "y"),
        "d": stepped(3, "z"),
        "e": stepped(4, "w"),
    }
    stages = {"a": 1, "b": 1, "c": 2, "d": 2, "e": 3}
    assert weight_hashes(3, replies, stages) == {1: (2, 1), 2: (1, 1), 3: (1, 1)}
    rows = [{"weight_hashes": {"1": [2, 1], "2": [1, 1]}, "resynced": 0},
            {"weight_hashes": {"1": [2, 2], "2": [2, 1]}, "resynced": 1}, {}]  # fmt: skip
    assert replica_agreement(rows) == {"compared": 3, "differed": 1, "resynced": 1}


def test_a_data_node_whose_stage_0_differs_is_detected_and_resynced(caplog) -> None:
    """Three data nodes each hold stage 0. data-0 (the lowest id: the tie-breaker and averaging leader) gets its
    stage 0 nudged before step 1; the other two outvote it after that step, it downloads their stage 0 (weights and
    Adam moments) before step 2, and the three agree again."""

    async def main():
        swarm = InProcessSwarm(small_config(steps=3, stages=2, microbatches=3), settings=fast_swarm(), data_nodes=3)
        await swarm.start()
        rows = []
        try:
            for step in range(3):
                if step == 1:
                    with torch.no_grad():
                        next(swarm.data_nodes[0].stage0.module.parameters()).add_(1e-3)
                result = await swarm.step()
                assert all(r.lost == 0 for r in result.reports)
                rows.append([(r.weight_hashes.get(0), r.resynced) for r in result.reports])
                states = [d.stage0.state() for d in swarm.data_nodes]
                for tensors, meta in states[1:]:  # weights and moments bit-identical, same version
                    assert meta["version"] == states[0][1]["version"] == step + 1
                    assert all(torch.equal(t, states[0][0][k]) for k, t in tensors.items())
        finally:
            await swarm.close()
        return rows

    with caplog.at_level(logging.INFO):
        rows = run(main())
    assert rows[0] == [((3, 1), 0)] * 3  # compared, identical
    assert rows[1] == [((3, 2), 1), ((3, 2), 0), ((3, 2), 0)]  # data-0 differed and resynced itself
    assert rows[2] == [((3, 1), 0)] * 3
    assert caplog.text.count("has stage 0") == 1 and "stage 0 resynced from" in caplog.text
