"""train.precision = bf16: autocast in the compute thread, fp32 master weights, activations on the wire in bf16;
the loss curve stays within a stated tolerance of fp32's, and train-local in bf16 gives the swarm's losses."""

import pytest
import torch

from gwtf.config import TrainConfig, with_overrides
from gwtf.errors import UserError
from gwtf.trainer import train_local
from tests.test_swarm_inprocess import STEPS, run, small_config, train_swarm

# bf16 keeps 8 bits of mantissa: over 20 steps of the debug model the per-step loss stays within this of fp32's (we
# measured at most 0.00075 on this config, CPU autocast; the loss itself falls by more than 0.3)
BF16_TOLERANCE = 0.01


def test_precision_is_checked() -> None:
    with pytest.raises(UserError, match="fp16"):
        TrainConfig(precision="fp16")


def test_bf16_swarm_tracks_the_fp32_reference_over_20_steps() -> None:
    fp32 = small_config()
    reference = train_local(fp32, progress=False)["losses"]
    bf16 = with_overrides(fp32, ["train.precision=bf16"])
    seen: dict[str, object] = {}

    async def spy(step, swarm):
        if step == 0:  # every activation message in the bf16 run carries bf16, and nothing else is accepted
            relay = next(iter(swarm.relays.values()))
            original = relay.replica.forward

            def forward(key, hidden):
                seen["wire"] = hidden.dtype
                out = original(key, hidden)
                seen["out"] = out.dtype
                return out

            relay.replica.forward = forward

    losses, swarm = run(train_swarm(bf16, STEPS, on_step=spy))
    assert seen == {"wire": torch.bfloat16, "out": torch.bfloat16}
    for node in swarm.relays.values():  # the master weights stay fp32
        assert all(p.dtype == torch.float32 for p in node.replica.module.parameters())
    diffs = [abs(a - b) for a, b in zip(losses, reference)]
    assert max(diffs) < BF16_TOLERANCE, diffs
    assert losses != pytest.approx(reference, abs=1e-6)  # bf16 did compute in bf16
    assert losses[-1] < losses[0] - 0.3
    # train-local in bf16 computes as the swarm does (autocast per stage, bf16 rounding where messages travel, both
    # ways): the same losses, bit for bit (without the rounding they differ from step 0, by about 4e-5)
    local = train_local(bf16, progress=False)
    assert local["losses"] == losses and local["config"]["train"]["precision"] == "bf16"
