"""Stage recovery: the CheckFree formula, CheckFree+ order and edge copies, the baselines, the failure schedule,
and a tiny training run where CheckFree rebuilds a lost middle stage better than copying a neighbour."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from gwtf.errors import UserError
from gwtf.models.presets import get_preset
from gwtf.models.staged import build_stage
from gwtf.optim import OptimConfig, make_optimizer
from gwtf.recovery import (
    CheckpointStore,
    FailureSchedule,
    RecoveryError,
    install,
    iteration_failure_probability,
    make_strategy,
    swap_order,
)

CFG = get_preset("debug", stages=6)  # 6 equal relay stages of one layer


def linear(value: float) -> nn.Module:
    module = nn.Linear(2, 2)
    with torch.no_grad():
        module.weight.fill_(value)
        module.bias.fill_(-value)
    return module


def test_checkfree_is_the_gradient_norm_weighted_average():
    stages = {2: linear(1.0), 4: linear(5.0)}
    rebuilt = make_strategy("checkfree").rebuild(3, stages, {2: 1.0, 4: 3.0}, CFG, seed=0)
    assert torch.allclose(rebuilt.state_dict["weight"], torch.full((2, 2), (1 * 1.0 + 3 * 5.0) / 4))
    assert torch.allclose(rebuilt.state_dict["bias"], torch.full((2,), -(1 * 1.0 + 3 * 5.0) / 4))
    assert rebuilt.fresh_optimizer and rebuilt.lr_scale > 1.0 and rebuilt.source == "mean(2,4)"
    squared = make_strategy("checkfree", weighting="squared").rebuild(3, stages, {2: 1.0, 4: 3.0}, CFG, seed=0)
    assert torch.allclose(squared.state_dict["weight"], torch.full((2, 2), (1 * 1.0 + 9 * 5.0) / 10))


def test_checkfree_equal_norms_give_the_plain_mean_and_neighbours_stay_untouched():
    a, b = build_stage(CFG, 2, seed=1), build_stage(CFG, 4, seed=2)
    before = copy.deepcopy(a.state_dict())
    rebuilt = make_strategy("checkfree").rebuild(3, {2: a, 4: b}, {2: 0.7, 4: 0.7}, CFG, seed=0)
    for name, tensor in rebuilt.state_dict.items():
        assert torch.allclose(tensor, (a.state_dict()[name] + b.state_dict()[name]) / 2)
    assert all(torch.equal(before[n], t) for n, t in a.state_dict().items())


def test_checkfree_edge_stage_copies_its_one_neighbour_and_lr_boost_decays():
    stages = {2: linear(2.0), 3: linear(3.0)}
    rebuilt = make_strategy("checkfree", lr_scale=1.2, lr_decay_steps=10).rebuild(1, stages, {}, CFG, seed=0)
    assert torch.equal(rebuilt.state_dict["weight"], stages[2].weight) and rebuilt.source == "copy(2)"
    assert rebuilt.lr_scale_at(0) == pytest.approx(1.2) and rebuilt.lr_scale_at(5) == pytest.approx(1.1)
    assert rebuilt.lr_scale_at(10) == 1.0 == rebuilt.lr_scale_at(50)


def test_checkfree_plus_swap_order_and_edge_copies_partner():
    assert swap_order(6, 0) == [1, 2, 3, 4, 5, 6]
    assert swap_order(6, 1) == [2, 1, 3, 4, 6, 5] and swap_order(6, 3) == swap_order(6, 1)
    assert swap_order(4, 1) == [2, 1, 4, 3]
    plus = make_strategy("checkfree+")
    assert plus.stage_order(6, 1) == [2, 1, 3, 4, 6, 5]
    stages = {k: linear(float(k)) for k in range(1, 7)}
    last = plus.rebuild(6, {k: m for k, m in stages.items() if k != 6}, {}, CFG, seed=0)
    first = plus.rebuild(1, {k: m for k, m in stages.items() if k != 1}, {}, CFG, seed=0)
    middle = plus.rebuild(3, {k: m for k, m in stages.items() if k != 3}, {2: 1.0, 4: 1.0}, CFG, seed=0)
    assert float(last.state_dict["weight"][0, 0]) == 5.0 and float(first.state_dict["weight"][0, 0]) == 2.0
    assert float(middle.state_dict["weight"][0, 0]) == 3.0  # (2 + 4) / 2


def test_strategies_refuse_what_they_cannot_do():
    uneven = get_preset("debug").replace(n_layers=5)
    for name in ("checkfree", "checkfree+", "copy"):
        with pytest.raises(UserError, match="equal stages"):
            make_strategy(name).check(uneven)
    make_strategy("random").check(uneven)
    with pytest.raises(UserError, match="at least 4"):
        make_strategy("checkfree+").check(get_preset("debug", stages=3))
    with pytest.raises(UserError, match="unknown recovery strategy"):
        make_strategy("magic")
    with pytest.raises(RecoveryError):
        make_strategy("checkfree").rebuild(3, {}, {}, CFG, seed=0)


def test_copy_and_random():
    a, b = build_stage(CFG, 2, seed=1), build_stage(CFG, 4, seed=2)
    copied = make_strategy("copy").rebuild(3, {2: a, 4: b}, {}, CFG, seed=0)
    assert all(torch.equal(t, a.state_dict()[n]) for n, t in copied.state_dict.items())
    first = make_strategy("copy").rebuild(1, {2: a, 4: b}, {}, CFG, seed=0)
    assert all(torch.equal(t, a.state_dict()[n]) for n, t in first.state_dict.items())
    fresh = make_strategy("random").rebuild(3, {2: a, 4: b}, {}, CFG, seed=5)
    expected = build_stage(CFG, 3, seed=5).state_dict()
    assert all(torch.equal(t, expected[n]) for n, t in fresh.state_dict.items())
    other = make_strategy("random").rebuild(3, {2: a, 4: b}, {}, CFG, seed=6)
    assert not torch.equal(
        other.state_dict["blocks.0.mlp.up_proj.weight"], fresh.state_dict["blocks.0.mlp.up_proj.weight"]
    )
    assert fresh.fresh_optimizer and copied.fresh_optimizer


def _sgd_steps(modules, opts, n):
    for _ in range(n):
        for k, m in modules.items():
            opts[k].zero_grad()
            m(torch.ones(1, 2)).pow(2).sum().backward()
            opts[k].step()


def test_checkpoint_rollback_restores_exact_weights_and_optimizer_state():
    torch.manual_seed(0)
    modules = {k: nn.Linear(2, 2) for k in range(3)}
    opts = {k: make_optimizer(m, OptimConfig()) for k, m in modules.items()}
    strategy = make_strategy("checkpoint", every=2)
    strategy.after_step(0, modules, opts)
    _sgd_steps(modules, opts, 2)
    strategy.after_step(2, modules, opts)  # a complete checkpoint at step 2
    saved = {k: copy.deepcopy(m.state_dict()) for k, m in modules.items()}
    saved_moments = copy.deepcopy(opts[1].state_dict()["state"])
    _sgd_steps(modules, opts, 1)
    strategy.after_step(3, modules, opts)  # not due
    assert strategy.store is not None
    strategy.store.save_stage(4, 0, modules[0], opts[0])  # half-written: not complete, not used
    rebuilt = strategy.rebuild(1, {2: modules[2]}, {}, get_preset("debug"), seed=0)
    assert not rebuilt.fresh_optimizer and rebuilt.source == "checkpoint@2"
    opts[1] = install(rebuilt, modules[1], opts[1], lambda m: make_optimizer(m, OptimConfig()))
    assert strategy.rollback(modules, opts) == 2
    for k, m in modules.items():
        assert all(torch.equal(t, saved[k][n]) for n, t in m.state_dict().items())
    restored = opts[1].state_dict()["state"]
    assert all(torch.equal(restored[i]["exp_avg"], saved_moments[i]["exp_avg"]) for i in saved_moments)


def test_an_asynchronous_checkpoint_counts_only_once_its_upload_has_finished():
    torch.manual_seed(0)
    modules = {k: nn.Linear(2, 2) for k in range(2)}
    opts = {k: make_optimizer(m, OptimConfig()) for k, m in modules.items()}
    strategy = make_strategy("checkpoint", every=2, lag=3)
    strategy.after_step(0, modules, opts)  # the initial state: in storage before training starts
    assert strategy.store is not None and strategy.store.latest().step == 0
    for step in range(1, 6):
        _sgd_steps(modules, opts, 1)
        strategy.after_step(step, modules, opts)
        # the snapshot of step 2 is uploading during steps 3-4, and counts from step 5
        assert strategy.store.latest().step == (2 if step >= 5 else 0)
    _sgd_steps(modules, opts, 1)
    strategy.after_step(6, modules, opts)  # snapshot 4 uploads until step 7 ...
    assert strategy.rollback(modules, opts) == 2  # ... so a loss at step 6 goes back to step 2
    strategy.after_step(3, modules, opts)
    strategy.after_step(7, modules, opts)
    assert strategy.store.latest().step == 2  # the upload of snapshot 4 died with the rolled-back run


def test_checkpoint_store_needs_a_complete_checkpoint():
    store = CheckpointStore(every=5, stage_ids=[0, 1])
    assert store.due(10) and not store.due(7) and store.latest() is None
    with pytest.raises(RecoveryError):
        store.rollback({}, {})


def test_redundant_takes_over_exactly():
    modules = {k: nn.Linear(2, 2) for k in range(4)}
    opts = {k: make_optimizer(m, OptimConfig()) for k, m in modules.items()}
    strategy = make_strategy("redundant")
    _sgd_steps(modules, opts, 1)
    strategy.after_step(1, modules, opts)
    taken = strategy.rebuild(2, {1: modules[1], 3: modules[3]}, {}, CFG, seed=0)
    assert all(torch.equal(t, modules[2].state_dict()[n]) for n, t in taken.state_dict.items())
    assert not taken.fresh_optimizer and taken.optimizer_state is not None and strategy.extra_forward_fraction > 0
    orphan = strategy.rebuild(2, {3: modules[3]}, {}, CFG, seed=0)  # its holder, stage 1, died too
    assert "shadow lost" in orphan.source
    # stage 1's shadow lives on stage 2, as in the live swarm (gwtf.recovery.redundant.shadow_holder_stage)
    assert strategy.rebuild(1, {2: modules[2], 3: modules[3]}, {}, CFG, seed=0).source == "shadow@2"
    assert "shadow lost" in strategy.rebuild(1, {3: modules[3]}, {}, CFG, seed=0).source


def test_failure_probability_conversion():
    assert iteration_failure_probability(0.10, 60) == pytest.approx(1 - 0.9 ** (60 / 3600))
    assert iteration_failure_probability(0.10, 3600) == pytest.approx(0.10)
    assert FailureSchedule(6, 0.10).p_iter == pytest.approx(0.001754, rel=1e-3)  # ~0.002 as in the paper
    with pytest.raises(UserError):
        FailureSchedule(6, 1.5)


def test_failure_schedule_is_seeded_and_matches_its_rate():
    a = FailureSchedule(6, 0.33, iter_time_s=3600, seed=3)
    b = FailureSchedule(6, 0.33, iter_time_s=3600, seed=3)
    assert a.events(200) == b.events(200) and a.lost_at(57) == a.lost_at(57)
    assert a.events(200) != FailureSchedule(6, 0.33, iter_time_s=3600, seed=4).events(200)
    lost = sum(len(s) for _, s in a.events(1000))
    assert abs(lost / 6000 - 0.33) < 0.03
    assert FailureSchedule(6, 0.0).events(1000) == []
    explicit = FailureSchedule.parse_explicit("100,200:3,250:1+6", 6, seed=0)
    assert explicit[200] == [3] and explicit[250] == [1, 6] and 2 <= explicit[100][0] <= 5
    sched = FailureSchedule(6, 0.0, explicit=explicit)
    assert [i for i, _ in sched.events(300)] == [100, 200, 250]
    with pytest.raises(UserError):
        FailureSchedule.parse_explicit("ten", 6)


# Seeds and margin of the tiny-training comparison (its docstring says what was measured).
REBUILD_SEEDS = (0, 1)
REBUILD_MARGIN = 0.002


def _rebuild_gap(seed: int, strategy: str = "checkfree") -> float:
    """Train the debug model 120 steps (model and data order from `seed`), lose middle stage 2, rebuild it with
    `strategy` and with a copy of stage 1: the copy's validation loss minus the strategy's, on 256 held-out rows."""
    from gwtf.config import load_config
    from gwtf.data import MicrobatchSchedule, load_data
    from gwtf.models.staged import build_stages
    from gwtf.optim import lr_at
    from gwtf.trainer import pipeline_loss, train_step

    run = load_config(None, ["data.max_bytes=300000", "model.seq_len=32", "optim.warmup_steps=5"])
    cfg = run.model_config()
    data = load_data(run.data, cfg.seq_len)
    schedule = MicrobatchSchedule(data.train, 8, 1, 1, seed=seed)
    stages = build_stages(cfg, seed=seed)
    opts = [make_optimizer(s, run.optim) for s in stages]
    for step in range(120):
        train_step(stages, opts, schedule.global_batch(step), lr_at(step, 240, run.optim))
    norms = {k: float(torch.stack([p.grad.norm() for p in stages[k].parameters()]).norm()) for k in (1, 3)}
    live = {k: stages[k] for k in (1, 3, 4)}

    @torch.no_grad()
    def loss_with(name):
        rebuilt = make_strategy(name).rebuild(2, live, norms, cfg, seed=99)
        module = copy.deepcopy(stages[2])
        module.load_state_dict(rebuilt.state_dict)
        return pipeline_loss([stages[0], stages[1], module, stages[3], stages[4]], data.val[:256]).item()

    rebuilt, copied = loss_with(strategy), loss_with("copy")
    assert torch.isfinite(torch.tensor([rebuilt, copied])).all()
    return copied - rebuilt


def test_tiny_training_checkfree_rebuild_beats_copying_a_neighbour():
    """Train the debug model, lose middle stage 2, rebuild it: the CheckFree average loses less than a copy of
    stage 1, by more than REBUILD_MARGIN nats on average over REBUILD_SEEDS.

    What it rests on, measured (embedded corpus, 4 relay stages, 120 steps, 256 validation rows): copy minus
    CheckFree over seeds 0..9 was 0.0308 0.0074 0.0087 0.0053 0.1134 0.0103 0.0061 0.0172 0.0008 0.0420: positive
    for every seed, median 0.0095, a long tail. A single seed cannot carry a fixed margin (the old 0.01 on seed 0
    alone, scored on 16 rows, where the gap read 0.0082, failed), and a change of numerics (another BLAS, thread
    count or CPU) moves a run to another point of that spread as a new seed would. The mean over any two of the
    ten is at least 0.0030 (the two smallest), so 0.002 holds for every pair measured; here seeds 0 and 1 give
    0.0191. If CheckFree were no better than a copy the gap would be 0 (rebuilding with "copy" fails this test).
    It is a comparison with the `copy` baseline (stage 1, the neighbour before), not with any copy: copying stage 3
    instead gave gaps 0.0789 and -0.0136 on seeds 0 and 1 and would pass too.
    The advantage needs training: after 30 or 60 steps the copy was as good or better on most seeds, and for a
    lost stage 3 (mean(2,4) against copy(2)) it was negative on 3 seeds of 10 at 120 and at 200 steps, so the
    claim tested is this one and no wider.

    (Against a random re-init it does not win on this one-layer-per-stage model: a fresh block is close to the
    identity on the residual stream, i.e. to skipping the layer; see the benchmark notes in gwtf/recovery/.)"""
    gaps = [_rebuild_gap(seed) for seed in REBUILD_SEEDS]
    assert sum(gaps) / len(gaps) > REBUILD_MARGIN, f"copy - checkfree per seed {REBUILD_SEEDS}: {gaps}"


def test_the_fair_checkpoint_cost_model_saves_in_the_background_and_restores_in_parallel():
    from gwtf.benchmarks.recovery import HOST_COPY_BYTES_S, CostModel

    shards = {0: 300e6, 1: 100e6, 2: 100e6}  # stage 0 holds the embedding and the head
    c = CostModel(iter_time_s=10.0, relay_weight_bytes=100e6 / 3, shard_bytes=shards, bandwidth_bytes_s=50e6,
                  storage_bytes_s=10e6, restart_s=30.0)  # fmt: skip
    assert c.upload_s == 30.0  # every stage over its own link: the largest shard, not the sum
    assert c.snapshot_s == pytest.approx(300e6 / HOST_COPY_BYTES_S)
    assert c.upload_lag == 3  # restorable 3 steps after its snapshot
    assert c.save_stall_s(every=5) == pytest.approx(c.snapshot_s)  # the upload hides behind 5 steps of training
    assert c.save_stall_s(every=2) == pytest.approx(c.snapshot_s + 10.0)  # ... but not behind 2
    assert c.restore_s == 60.0  # fixed restart + the parallel loads
    assert c.young_interval(10.0, 6) >= c.upload_lag
    assert c.transfer_s(2.0) == pytest.approx(2 * (100e6 / 3) / 50e6)


def test_strategies_that_train_plainly_share_the_run_until_the_first_failure_and_end_the_same():
    """benchmarks.recovery's shared prefix: checkfree, copy and random start from one copy of the failure-free run's
    state at the first failure; every figure is the same as when each trains from step 0. checkfree+ (swapped order)
    and checkpoint (saves after steps) train their own way from step 0."""
    from gwtf.benchmarks.recovery import Bench, BenchConfig, trains_plainly
    from gwtf.recovery import make_strategy

    assert [trains_plainly(make_strategy(n)) for n in ("checkfree", "copy", "random")] == [True] * 3
    assert not trains_plainly(make_strategy("checkfree+")) and not trains_plainly(make_strategy("checkpoint"))
    cfg = BenchConfig(stages=3, steps=6, eval_every=3, val_batches=1, max_bytes=60_000, failures_at="4",
                      failure_rate=0.0, iter_time_s=1.0,
                      strategies=["none", "checkfree", "copy", "random"])  # fmt: skip
    figures = {}
    for shared in (True, False):
        bench = Bench(replace(cfg, shared_prefix=shared))
        runs = [bench.run(name) for name in cfg.strategies]
        assert (bench._prefix is not None) == shared
        figures[shared] = [(r.curve, r.recoveries, r.clock.modelled_s, r.clock.executed, r.step) for r in runs]
    assert figures[True] == figures[False]
