"""Redundant computation (Bamboo) in the live runtime: shadows of the neighbouring stage kept in step by deltas (the
stage's averaged gradients, checked by its weights hash) or by fetching, their forward run on every microbatch, and
an exact takeover of a stage that lost every replica."""

import asyncio
import contextlib
import logging

import pytest
import torch
from torch import nn

from gwtf.benchmarks.harness.swarm_run import REDUNDANT_COST, redundancy_cost
from gwtf.errors import PeerError
from gwtf.faults import Fault
from gwtf.optim import OptimConfig
from gwtf.recovery.redundant import Shadow, shadow_holder_stage, shadowed_stages
from gwtf.recovery.redundant import redundancy_cost as cost_line
from gwtf.stage import StageReplica
from gwtf.trainer import train_local
from tests.support import InProcessSwarm
from tests.test_stage_loss import LOSS_AT, STEPS, params, train_losing_a_stage
from tests.test_swarm_inprocess import fast_swarm, run, small_config

# ---------------------------------------------------------------------------------------------------------------
# bookkeeping


def test_each_stage_is_shadowed_by_the_stage_before_it_and_stage_1_by_stage_2():
    assert shadow_holder_stage(1, 1) is None and shadowed_stages(1, 1) == []  # one relay stage: nobody holds it
    assert {k: shadow_holder_stage(k, 3) for k in (1, 2, 3)} == {1: 2, 2: 1, 3: 2}
    assert {k: shadowed_stages(k, 3) for k in (1, 2, 3)} == {1: [2], 2: [1, 3], 3: []}
    for n in range(2, 7):
        for k in range(1, n + 1):
            holder = shadow_holder_stage(k, n)
            assert holder is not None and abs(holder - k) == 1 and k in shadowed_stages(holder, n)
        assert sorted(j for k in range(1, n + 1) for j in shadowed_stages(k, n)) == list(range(1, n + 1))


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x)


def shadow_of(fed: bool) -> Shadow:
    return Shadow(StageReplica(2, Counting(), OptimConfig(), total_steps=10), fed=fed)


def test_a_shadow_forward_computes_only_where_fed_keeps_no_graph_and_is_counted():
    fed, unfed = shadow_of(True), shadow_of(False)
    x = torch.randn(2, 3, 4, requires_grad=True)
    for shadow in (fed, unfed):
        shadow.timed_forward(x)
        shadow.timed_forward(x)
        assert shadow.forwards == 2 and shadow.forward_s >= 0
        assert all(p.grad is None for p in shadow.replica.module.parameters())
    assert fed.replica.module.calls == 2 and unfed.replica.module.calls == 0  # stage 2 has no input for stage 1
    assert x.grad is None and fed.version == 0 and fed.stage == 2


class BusyRelay:
    """What the redundant forwards use of a relay: its compute thread (inline here), its closed flag and the
    forwards of its own waiting for that thread."""

    def __init__(self) -> None:
        self.incoming: set = {("data", 0, 0)}  # one forward of its own waits
        self.closed = False

    async def compute(self, fn, *args):
        return fn(*args)

    def task_done(self, task) -> None:
        assert task.cancelled() or task.exception() is None


def test_redundant_forwards_wait_for_a_bubble_in_the_relays_own_work():
    from gwtf.recovery.redundant import RedundantRecovery

    async def main():
        strategy, relay = RedundantRecovery(), BusyRelay()
        strategy.shadows = {2: shadow_of(True)}
        for _ in range(3):
            strategy.on_forward(relay, torch.randn(2, 3, 4))
        await asyncio.sleep(0.05)
        assert strategy.shadows[2].forwards == 0 and len(strategy.backlog) == 3  # its own forward goes first
        relay.incoming.clear()  # a bubble
        await asyncio.wait_for(strategy.drainer, timeout=5)
        assert strategy.shadows[2].forwards == 3 and not strategy.backlog
        strategy.close()

    asyncio.run(main())


def test_the_harness_reads_the_cost_line_the_relays_log(tmp_path):
    a, b = shadow_of(True), shadow_of(False)
    a.fetched_bytes, a.forwards, a.forward_s, b.fetched_bytes = 1000, 3, 0.25, 500
    line = cost_line({2: a, 1: b})
    assert REDUNDANT_COST.search(line)
    (tmp_path / "r1.log").write_text(f"x\n{cost_line({2: shadow_of(True)})}\n{line}\n")  # the last line counts
    (tmp_path / "r2.log").write_text(line)
    total = redundancy_cost([tmp_path / "r1.log", tmp_path / "r2.log", tmp_path / "gone.log"])
    assert total == {"shadow_bytes": 3000, "redundant_forward_s": 0.5, "redundant_forwards": 6}


# ---------------------------------------------------------------------------------------------------------------
# live swarms (in-process transport)


async def wait_for_shadows(swarm: InProcessSwarm, version: int) -> None:
    """Shadows update in the background after a step: wait (bounded) until every one is at `version` (and exact:
    one whose delta failed its hash check is still downloading)."""
    for _ in range(300):
        shadows = [s for n in swarm.relays.values() for s in n.recovery.shadows.values()]
        if all(s.version >= version and s.exact for s in shadows):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"shadows not at v{version}")


@contextlib.asynccontextmanager
async def redundant_swarm(cfg, steps: int = 0):
    """A started one-replica swarm under recovery="redundant", `steps` steps in with every shadow at that version;
    closed on the way out."""
    swarm = InProcessSwarm(cfg, replicas=1, settings=fast_swarm("recovery.strategy=redundant"))
    await swarm.start()
    try:
        for _ in range(steps):
            await swarm.step()
        await wait_for_shadows(swarm, steps)
        yield swarm
    finally:
        await swarm.close()


def test_shadows_follow_their_stage_and_change_no_loss():
    cfg = small_config(steps=5, microbatches=2, stages=3)
    reference = train_local(cfg, progress=False)["losses"]

    async def go():
        losses = []
        async with redundant_swarm(cfg) as swarm:
            for step in range(5):
                losses.append((await swarm.step()).loss)
                await wait_for_shadows(swarm, step + 1)
            by_stage = {n.stage: n for n in swarm.relays.values()}
            for holder in by_stage.values():
                for k, shadow in holder.recovery.shadows.items():  # exact copies of the stage they shadow
                    assert shadow.version == by_stage[k].replica.version == 5
                    for got, want in zip(params(shadow), params(by_stage[k])):
                        assert torch.equal(got, want)
                    assert shadow.forwards == 5 * 2 and shadow.fetched_bytes > 0  # every microbatch forwarded
                    assert shadow.replica.module is not by_stage[k].replica.module
                    assert shadow.fed == (k == holder.stage + 1)
            with pytest.raises(PeerError, match="holds no shadow of stage 2"):
                await by_stage[1].call(by_stage[3].peer_id, "get_shadow", by_stage[1].message("x", meta={"stage": 2}))
        return losses

    assert run(go()) == pytest.approx(reference, abs=1e-4)  # the redundant forwards change nothing


def _same_state(a: StageReplica, b: StageReplica) -> bool:
    """Weights, both Adam moments, step counts and version, bit for bit."""
    (ta, ma), (tb, mb) = a.state(), b.state()
    same = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    return same and ma["version"] == mb["version"] and ma["steps"] == mb["steps"]


def _shadow_bytes_per_step(deltas: bool, monkeypatch, steps: int = 4, spoil_at: int | None = None):
    """Train `steps` steps on a 3-stage one-replica redundant swarm; after every step check each shadow equals its
    stage bit for bit. Returns per shadow (holder stage, stage): (bytes received, deltas, full downloads, trainable
    parameters). `deltas` False: the delta path is off (the full download of every step, as before it existed).
    `spoil_at`: the delta to that version leaves the shadow's weights off by a little (as another device's kernels
    could), which its hash check must catch."""
    from gwtf.recovery import redundant

    if not deltas:
        monkeypatch.setattr(redundant.RedundantRecovery, "_delta_refresh", lambda *a: asyncio.sleep(0, False))
    if spoil_at is not None:
        apply = redundant._apply_step

        def spoiled(replica, grads, version):
            digest = apply(replica, grads, version)
            if version != spoil_at:
                return digest
            with torch.no_grad():
                next(replica.module.parameters()).add_(1e-6)
            replica._digest = None
            return replica.weights_digest()

        monkeypatch.setattr(redundant, "_apply_step", spoiled)
    cfg = small_config(steps=steps, microbatches=2, stages=3)

    async def go():
        out = {}
        async with redundant_swarm(cfg) as swarm:
            by_stage = {n.stage: n for n in swarm.relays.values()}
            for step in range(steps):
                await swarm.step()
                await wait_for_shadows(swarm, step + 1)
                for holder in by_stage.values():
                    for k, shadow in holder.recovery.shadows.items():
                        assert shadow.exact and _same_state(shadow.replica, by_stage[k].replica), (step, k)
            for holder in by_stage.values():
                for k, shadow in holder.recovery.shadows.items():
                    numel = sum(p.numel() for p in by_stage[k].replica.trainable())
                    out[(holder.stage, k)] = (shadow.fetched_bytes, shadow.deltas, shadow.full_fetches, numel)
        return out

    return run(go())


def test_shadows_stay_exact_by_applying_their_stages_averaged_gradients_a_third_of_the_bytes(monkeypatch):
    steps = 4
    after = _shadow_bytes_per_step(True, monkeypatch, steps)
    monkeypatch.undo()
    before = _shadow_bytes_per_step(False, monkeypatch, steps)
    assert after.keys() == before.keys() == {(2, 1), (1, 2), (2, 3)}
    for key, (got, deltas, full, numel) in after.items():
        assert (deltas, full) == (steps, 0) and got == steps * 4 * numel  # the gradients: 4 bytes a parameter
        old, old_deltas, old_full, _ = before[key]
        assert (old_deltas, old_full) == (0, steps) and old == steps * 12 * numel  # weights + two Adam moments
        assert old == 3 * got


def test_a_delta_that_leaves_a_shadow_off_its_stage_is_caught_and_replaced_by_the_full_state(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="gwtf.recovery.redundant")
    out = _shadow_bytes_per_step(True, monkeypatch, steps=4, spoil_at=2)  # every shadow checked exact after each step
    for got, deltas, full, numel in out.values():
        assert (deltas, full) == (3, 1) and got == 4 * 4 * numel + 12 * numel  # four deltas received, one refused
    assert caplog.text.count("off its replica's weights after the delta to v2") == 3


def test_a_lost_middle_stage_is_taken_over_exactly_from_its_shadow():
    captured = {}

    async def before_loss(swarm: InProcessSwarm) -> None:
        await wait_for_shadows(swarm, LOSS_AT)
        victim = next(n for n in swarm.relays.values() if n.stage == 2)
        captured["victim"] = victim.replica.state()  # the lost stage's state: weights, moments, version
        captured["shadows"] = [n.recovery.shadows[2].replica.state() for n in swarm.relays.values() if n.stage == 1]

    losses, event, _ = train_losing_a_stage(stages=3, lost=2, recovery="redundant", before_loss=before_loss)
    joiner = event["joiner"]
    assert joiner.rebuilt_source == f"shadow@stage 1 v{LOSS_AT}"
    (victim, vmeta), (rebuilt, rmeta) = captured["victim"], event["state"]
    assert vmeta["version"] == rmeta["version"] == LOSS_AT and rmeta["lr_scale"] == 1.0  # no learning-rate boost
    assert vmeta["steps"] == rmeta["steps"] and victim.keys() == rebuilt.keys()
    for name, tensor in victim.items():  # weights and both Adam moments, bit for bit
        assert torch.equal(rebuilt[name], tensor), name
        for shadow, _ in captured["shadows"]:
            assert torch.equal(shadow[name], tensor), name
    assert joiner.replica.stats.backward > 0
    assert losses[-1] < losses[LOSS_AT] and losses[-1] < losses[0] - 0.3 and len(losses) == STEPS


def test_a_stage_whose_shadow_holder_died_too_falls_back_to_a_copy_and_says_so(caplog):
    """Stages 2 and 3 lose their one replica each at once: stage 3's shadow died with stage 2, so stage 3 copies stage 4
    (logged); stage 2's shadow, on stage 1, survived: stage 2 is taken over exactly."""
    cfg = small_config(steps=6, microbatches=2, stages=4)
    caplog.set_level(logging.WARNING, logger="gwtf.recovery.redundant")

    async def go():
        async with redundant_swarm(cfg, steps=3) as swarm:
            victims = {n.stage: n for n in swarm.relays.values() if n.stage in (2, 3)}
            lost = {k: n.replica.state()[0] for k, n in victims.items()}
            stage4 = params(next(n for n in swarm.relays.values() if n.stage == 4))
            for node in victims.values():  # both at once, between two steps
                await swarm.crash(node.peer_id)
            step = asyncio.ensure_future(swarm.step())
            third = await swarm.add_relay(3)
            third_weights = params(third)
            second = await swarm.add_relay(2)
            second_state = second.replica.state()[0]
            reports = [(await step).reports] + [(await swarm.step()).reports for _ in range(2)]
        assert all(r.lost == 0 for rs in reports for r in rs)
        return third, third_weights, stage4, second, second_state, lost

    third, third_weights, stage4, second, second_state, lost = run(go())
    assert third.rebuilt_source == "copy(4) (shadow lost)"
    assert all(torch.equal(a, b) for a, b in zip(third_weights, stage4))
    assert "no usable shadow of lost stage 3: no live relay of stage 2 holds one" in caplog.text
    assert second.rebuilt_source == "shadow@stage 1 v3"
    assert all(torch.equal(second_state[k], t) for k, t in lost[2].items())


def test_a_stage_lost_in_its_step_before_its_shadow_caught_up_takes_the_runs_version_without_that_update():
    """Stage 2 dies after averaging iteration 3, before applying the step: its neighbours step to v4, its shadow
    stays at v3 (what it held). The joiner takes the shadow over and moves to v4 without that one update."""
    cfg = small_config(steps=6, microbatches=2, stages=3)

    async def go():
        async with redundant_swarm(cfg, steps=3) as swarm:
            victim = next(n for n in swarm.relays.values() if n.stage == 2)
            swarm.faults.faults.append(Fault(victim.peer_id, 3, "optimizer_step"))
            reports = [(await swarm.step()).reports]
            assert victim.peer_id not in swarm.relays
            joiner = await swarm.add_relay(2)
            state = joiner.replica.state()
            reports += [(await swarm.step()).reports for _ in range(2)]
        assert all(r.lost == 0 for rs in reports for r in rs)
        return victim.replica.state(), joiner, state

    (lost, lost_meta), joiner, (rebuilt, meta) = run(go())
    assert joiner.rebuilt_source == "shadow@stage 1 v3, v4 without that step's update"
    assert lost_meta["version"] == 3 and meta["version"] == 4 and joiner.replica.version == 6
    assert all(torch.equal(rebuilt[k], t) for k, t in lost.items())  # the state it died with, exactly


def test_a_delta_that_does_not_fit_the_stage_is_refused_before_the_shadow_changes():
    from gwtf.errors import BadMessage
    from gwtf.recovery.redundant import _apply_step

    shadow = shadow_of(True)
    before = [p.detach().clone() for p in shadow.replica.module.parameters()]
    good = [torch.zeros_like(p) for p in shadow.replica.trainable()]
    for bad in (good[:1], [torch.zeros(3, 3), good[1]], [g.long() for g in good]):
        with pytest.raises(BadMessage, match="does not fit"):
            _apply_step(shadow.replica, bad, 1)
    assert shadow.replica.version == 0
    assert all(torch.equal(a, b) for a, b in zip(before, shadow.replica.module.parameters()))
    digest = _apply_step(shadow.replica, good, 1)  # a fitting one steps it, like the replica's own step
    assert shadow.replica.version == 1 and digest == shadow.replica.weights_digest()
