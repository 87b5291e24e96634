"""Device placement paths that run on a CPU: the --device flag's checks, CPU tensors handed to the transport in the
run's dtype, state loaded (Adam moments included) onto the parameter's device (the meta device stands in for a GPU)."""

import pytest
import torch
from torch import nn

from gwtf.device import check_device, resolve_device, timed, to_device, to_host
from gwtf.errors import UserError
from gwtf.optim import OptimConfig
from gwtf.runtime.spec import NodeOptions
from gwtf.stage import StageReplica


def test_device_flags() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    assert check_device(" CUDA:1 ") == "cuda:1" and NodeOptions(device="auto").device == "auto"
    for bad in ("gpu", "cuda:x", "cuda:", "tpu:0"):
        with pytest.raises(UserError, match="choose auto, cpu, cuda or cuda:N"):
            NodeOptions(device=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_line() -> None:
    with pytest.raises(UserError) as err:
        resolve_device("cuda")
    assert "sees no CUDA device" in str(err.value) and "\n" not in str(err.value)


def replica(precision: str = "fp32") -> StageReplica:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    return StageReplica(1, module, OptimConfig(lr=1e-2, warmup_steps=0), total_steps=10, precision=precision)


def test_forward_and_backward_hand_back_cpu_tensors_in_the_wire_dtype() -> None:
    r = replica("bf16")
    out = r.forward(("d", 0, 0), torch.randn(2, 3, 8).to(torch.bfloat16))
    assert out.device.type == "cpu" and out.dtype == torch.bfloat16 and not out.requires_grad
    grad = r.backward(("d", 0, 0), torch.ones(2, 3, 8, dtype=torch.bfloat16))
    assert grad.device.type == "cpu" and grad.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in r.module.parameters())  # fp32 masters
    assert to_host(torch.ones(2), torch.bfloat16).dtype == torch.bfloat16
    assert to_device(out, torch.device("cpu")) is out
    value, seconds = timed(torch.device("cpu"), sum, [1, 2])
    assert value == 3 and seconds >= 0


def test_state_loads_parameters_and_moments_onto_the_parameters_device() -> None:
    donor = replica()
    donor.forward(("d", 0, 0), torch.randn(2, 3, 8))
    donor.backward(("d", 0, 0), torch.ones(2, 3, 8))
    donor.apply_averaged(donor.grad_tensors(), 0)
    tensors, meta = donor.state()
    assert all(t.device.type == "cpu" for t in tensors.values())
    joiner = replica()
    joiner.module.to("meta")  # a stand-in for a CUDA device: the moments must follow the parameters there
    joiner.load_state(tensors, meta)
    for p in joiner.module.parameters():
        st = joiner.optimizer.state[p]
        assert st["exp_avg"].device.type == "meta" and st["exp_avg_sq"].device.type == "meta"
    back = replica()
    back.load_state(tensors, meta)  # and on the CPU, exactly the donor's
    assert back.weights_digest() == donor.weights_digest()
    assert all(t.device.type == "cpu" for t in back.grad_tensors())
