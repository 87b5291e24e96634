"""Averaging in byte-sized buckets: a stage of any number of tensors averages exactly, and its replicas stay
bit-identical (a message carries at most 64 tensors; an 8-layer LLaMA stage has 72)."""

import asyncio

import pytest
import torch

from gwtf.averaging import AveragingConfig, Buckets, GroupAverager
from gwtf.config import RunConfig, load_config
from gwtf.trainer import train_local
from gwtf.transport import InProcessNetwork, InProcessTransport
from gwtf.transport.message import MessageLimits
from tests.test_swarm_inprocess import assert_replicas_agree, fast_swarm, run, small_config, train_swarm

RUN = "buckets"


def test_buckets_round_trip_any_layout() -> None:
    grads = [torch.randn(3, 5), torch.randn(7), torch.randn(2, 2, 2).to(torch.float64), torch.randn(1)]
    b = Buckets.of(grads, bucket_bytes=4 * 6)  # 6 floats a bucket: tensors split across buckets
    assert [t.numel() for t in b.tensors] == [6, 6, 6, 6, 6, 1] and all(t.dtype == torch.float32 for t in b.tensors)
    back = b.unflatten(b.tensors)
    assert [g.shape for g in back] == [g.shape for g in grads] and back[2].dtype == torch.float64
    assert all(torch.allclose(x, y.float().to(x.dtype)) for x, y in zip(back, grads))
    assert Buckets.of(grads[:3], 24).layout != b.layout


def test_a_push_of_200_tensors_over_the_64_tensor_limit_averages_exactly() -> None:
    torch.manual_seed(0)
    grads = {p: [torch.randn(4, 3) for _ in range(200)] for p in ("a", "b", "c")}
    counts = {"a": 1, "b": 2, "c": 3}
    cfg = AveragingConfig(bucket_mb=0.001)  # ~1 KiB a bucket: 10 buckets

    async def main():
        net = InProcessNetwork()
        avgs = [GroupAverager(InProcessTransport(net, p, RUN), RUN, "stage1", timeout=5.0, config=cfg) for p in grads]
        assert MessageLimits().max_tensors < 200
        return await asyncio.gather(*(a.average(0, grads[p], counts[p], list(grads)) for a, p in zip(avgs, grads)))

    results = asyncio.run(main())
    expected = [sum(grads[p][i] for p in grads) / 6 for i in range(200)]
    for r in results:
        assert r.participants == ["a", "b", "c"] and r.total_count == 6 and len(r.grads) == 200
        assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(r.grads, expected))
        assert all(torch.equal(g, h) for g, h in zip(r.grads, results[0].grads))  # bit-identical everywhere


def many_tensor_stage() -> RunConfig:
    """One relay stage of 8 debug LLaMA layers: 72 parameter tensors."""
    cfg = small_config(steps=3, stages=1)
    cfg.model_overrides = {"n_layers": 8, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64}
    return cfg


def test_a_stage_of_72_tensors_with_two_replicas_stays_bit_identical() -> None:
    cfg = many_tensor_stage()
    assert len(list(cfg.model_config().layer_ranges()[0])) == 8
    settings = fast_swarm("averaging.bucket_mb=0.02")  # ~20 KiB: several buckets per push

    async def check_tensor_count(step, swarm):
        if step == 0:
            counts = [len(list(n.replica.module.parameters())) for n in swarm.relays.values()]
            assert counts == [72, 72], counts

    losses, swarm = run(train_swarm(cfg, 3, on_step=check_tensor_count, settings=settings, replicas=2))
    assert_replicas_agree(swarm)  # after every step too (train_swarm checks)
    versions = {n.replica.version for n in swarm.relays.values()}
    assert versions == {3}
    assert all(n.replica.stats.backward > 0 for n in swarm.relays.values()), "both replicas computed"


@pytest.mark.timeout(300)
@pytest.mark.integration  # real processes on hivemind; the fast tier checks the same in process (above)
def test_a_process_swarm_with_a_72_tensor_stage_keeps_its_two_replicas_identical(tmp_path) -> None:
    """`gwtf demo` with two relay stages of 8 layers (72 tensors each), 2 replicas each: the averaging rounds move in
    buckets, no replica is ever found off its stage's majority (each `stepped` reply carries its weights' hash), and
    the losses are train-local's (one data node, two replicas: data parallel within the stage)."""
    from tests.test_swarm_processes import SETTINGS, demo, node_warnings

    steps, model = 4, ["model.n_layers=16", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
                       "model.d_ff=64", "averaging.bucket_mb=0.02"]  # fmt: skip
    extra = sum((["--set", s] for s in model), [])
    summary = demo(tmp_path, "--replicas", "2", "--steps", str(steps), "--crash-at", "-1", "--seed", "5", *extra)
    cfg = load_config(None, [*SETTINGS, *model, "stages=2", f"train.steps={steps}", "train.seed=5",
                             "train.eval_every=0"])  # fmt: skip
    reference = train_local(cfg, progress=False)["losses"]
    warnings = node_warnings(tmp_path)
    assert "resyncing" not in warnings and "averaging round" not in warnings, warnings
    assert summary["losses"] == pytest.approx(reference, abs=1e-4)
    assert summary["microbatches"]["lost"] == 0
