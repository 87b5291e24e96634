"""What a volunteer with one CUDA GPU can check in a few minutes: the device paths of gwtf on a real GPU.

    python -m gwtf.benchmarks.gpu_check --json runs/gpu_check.json
    python -m gwtf.benchmarks.gpu_check --device cpu --quick --json runs/gpu_check_cpu.json   # a smoke run, no GPU

Sections (each bounded, each recorded in the JSON even when it fails):
    swarm_vs_local  a 1-replica in-process swarm on the device against single-process training (gwtf's reference
                    train_step) on the same device: per-step loss difference, and swarm tokens/s over single tokens/s
    donor_to_cpu    a GPU relay serving its stage's state to a CPU joiner: weights exact (hash), the next step works
    bf16            the swarm in bf16 against single-process fp32 on the same device (loss difference)
    drift           a CPU and a GPU replica stepping the same averaged gradients from the same weights: max weight
                    difference after each step (AdamW's kernels differ in the last bits; the weight hashes catch it)
    memory          peak device memory per held microbatch of one relay stage (124m and 1.5b presets), activation
                    checkpointing on and off, fp32 and bf16
    ack_delay       the event loop's worst delay (a 1 ms ticker) while the compute thread runs forwards

Without CUDA (and without --device cpu) it says so in one line and exits 2: the checks are about a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from gwtf.config import RunConfig, TrainConfig, with_overrides
from gwtf.data import DataConfig, MicrobatchSchedule, load_data
from gwtf.device import resolve_device, synchronize
from gwtf.membership import InMemoryMembership
from gwtf.models.presets import get_preset
from gwtf.models.staged import build_stage, build_stages
from gwtf.optim import OptimConfig, lr_at, make_optimizer
from gwtf.runtime.assembly import make_data_node, module_builder
from gwtf.runtime.relay import RelayNode
from gwtf.runtime.spec import NodeOptions, run_spec
from gwtf.stage import StageReplica
from gwtf.trainer import train_step
from gwtf.transport import InProcessNetwork, InProcessTransport

log = logging.getLogger(__name__)
SETTINGS = ["membership.heartbeat_s=0.1", "membership.record_ttl_s=0.6", "transport.call_timeout=30.0",
            "iteration.microbatch_timeout=60.0"]  # fmt: skip
LOSS_TOLERANCE = 1e-3  # swarm against single process on one device: same math, other kernel order at most


def run_config(quick: bool, precision: str = "fp32") -> RunConfig:
    """A debug-family model wide enough that a GPU has work to do (tiny under --quick)."""
    width = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 172} if quick else \
        {"d_model": 512, "n_heads": 8, "n_kv_heads": 8, "d_ff": 1408, "seq_len": 256}  # fmt: skip
    cfg = RunConfig(
        preset="debug", stages=3, model_overrides=width, data=DataConfig(max_bytes=400_000),
        optim=OptimConfig(lr=1e-3, warmup_steps=2),
        train=TrainConfig(steps=8, microbatch_size=8, microbatches_per_step=4, seed=3, eval_every=0,
                          precision=precision),
    )  # fmt: skip
    return with_overrides(cfg, SETTINGS)


class Swarm:
    """Relays and one data node as peers of one event loop (the tests' in-process swarm, with a device each)."""

    def __init__(self, cfg: RunConfig, device: str) -> None:
        self.spec = run_spec("gpu-check", cfg, 1)
        self.net, self.store = InProcessNetwork(), InMemoryMembership.shared_store()
        self.device, self.relays, self.count = device, [], 0
        self.data = load_data(cfg.data, self.spec.model.seq_len)
        self.data_node: Any = None

    def _peer(self, name: str) -> tuple[InProcessTransport, InMemoryMembership]:
        return InProcessTransport(self.net, name, "gpu-check"), InMemoryMembership(self.store, "gpu-check", name)

    async def add_relay(self, stage: int, device: str | None = None) -> RelayNode:
        self.count += 1
        transport, membership = self._peer(f"relay-s{stage}-{self.count}")
        node = RelayNode(self.spec, transport, membership, NodeOptions(capacity=4, device=device or self.device), stage)
        self.relays.append(node)
        await node.start(module_builder(self.spec))
        return node

    async def start(self) -> None:
        for k in range(1, self.spec.model.n_stages + 1):
            await self.add_relay(k)
        transport, membership = self._peer("data-0")
        opts = NodeOptions(device=self.device)
        self.data_node = make_data_node(self.spec, transport, membership, opts, 0, self.data)
        await self.data_node.start(expected_data_nodes=1, timeout=30)

    async def close(self) -> None:
        for node in [*self.relays, self.data_node]:
            if node is not None:
                await node.close()


async def swarm_losses(cfg: RunConfig, device: str) -> tuple[list[float], list[float]]:
    swarm = Swarm(cfg, device)
    await swarm.start()
    losses, seconds = [], []
    try:
        for _ in range(cfg.train.steps):
            report = await swarm.data_node.run_iteration()
            losses.append(report.loss)
            seconds.append(report.seconds)
    finally:
        await swarm.close()
    return losses, seconds


def local_losses(cfg: RunConfig, device: torch.device) -> tuple[list[float], list[float]]:
    """gwtf's reference train_step on `device` (fp32, or bf16 as a swarm computes it: gwtf.trainer.pipeline_loss)."""
    model = cfg.model_config()
    data = load_data(cfg.data, model.seq_len)
    t = cfg.train
    schedule = MicrobatchSchedule(data.train, t.microbatch_size, t.microbatches_per_step, 1, t.seed)
    stages = [s.to(device) for s in build_stages(model, t.seed)]
    opts = [make_optimizer(s, cfg.optim) for s in stages]
    losses, seconds = [], []
    for step in range(t.steps):
        batch = [x.to(device) for x in schedule.global_batch(step)]
        synchronize(device)
        t0 = time.perf_counter()
        losses.append(train_step(stages, opts, batch, lr_at(step, t.steps, cfg.optim), t.precision))
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return losses, seconds


def check_swarm_vs_local(device: torch.device, quick: bool) -> dict[str, Any]:
    cfg = run_config(quick)
    swarm, swarm_s = asyncio.run(swarm_losses(cfg, str(device)))
    local, local_s = local_losses(cfg, device)
    diffs = [abs(a - b) for a, b in zip(swarm, local)]
    tokens = cfg.train.microbatches_per_step * cfg.train.microbatch_size * cfg.model_config().seq_len
    steady = slice(2, None)  # the first steps warm the allocator and the kernels up
    swarm_tps = tokens / (sum(swarm_s[steady]) / len(swarm_s[steady]))
    local_tps = tokens / (sum(local_s[steady]) / len(local_s[steady]))
    return {
        "swarm_losses": swarm, "local_losses": local, "max_loss_diff": max(diffs),
        "tolerance": LOSS_TOLERANCE, "ok": max(diffs) < LOSS_TOLERANCE,
        "swarm_tokens_per_s": swarm_tps, "local_tokens_per_s": local_tps, "swarm_over_local": swarm_tps / local_tps,
    }  # fmt: skip


def check_bf16(device: torch.device, quick: bool) -> dict[str, Any]:
    """The swarm in bf16 against single-process fp32 on the same device: the loss stays within the tests' bound."""
    cfg = run_config(quick)
    bf16, _ = asyncio.run(swarm_losses(with_overrides(cfg, ["train.precision=bf16"]), str(device)))
    fp32, _ = local_losses(cfg, device)
    diffs = [abs(a - b) for a, b in zip(bf16, fp32)]
    return {"bf16_losses": bf16, "fp32_losses": fp32, "max_loss_diff": max(diffs)}


async def donor_to_cpu(device: str, quick: bool) -> dict[str, Any]:
    """Two steps on the device; a CPU relay joins stage 1 (downloads from the device replica); two more steps with
    both (the consistency check resyncs the CPU replica if their steps differ)."""
    cfg = with_overrides(run_config(quick), ["train.steps=4"])
    swarm = Swarm(cfg, device)
    await swarm.start()
    try:
        for _ in range(2):
            await swarm.data_node.run_iteration()
        donor = swarm.relays[0]
        joiner = await swarm.add_relay(1, device="cpu")
        assert donor.replica is not None and joiner.replica is not None
        donor_hash, joiner_hash = donor.replica.weights_digest(), joiner.replica.weights_digest()
        losses = [(await swarm.data_node.run_iteration()).loss for _ in range(2)]
        after = donor.replica.weights_digest() == joiner.replica.weights_digest()
        return {"joiner_device": str(joiner.replica.device), "donor_device": str(donor.replica.device),
                "weights_exact_after_download": donor_hash == joiner_hash, "next_steps_loss": losses,
                "next_steps_ok": all(math.isfinite(v) for v in losses),
                "identical_after_next_steps": after}  # fmt: skip
    finally:
        await swarm.close()


def check_drift(device: torch.device, quick: bool, steps: int = 20) -> dict[str, Any]:
    cfg = run_config(quick).model_config()
    optim = OptimConfig(lr=1e-3, warmup_steps=2)
    a = StageReplica(1, build_stage(cfg, 1, 0), optim, total_steps=steps)
    b = StageReplica(1, build_stage(cfg, 1, 0).to(device), optim, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    drift = []
    for i in range(steps):
        grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in a.module.parameters()]  # one averaged result
        a.apply_averaged(grads, i)
        b.apply_averaged(grads, i)
        drift.append(max(float((p.detach() - q.detach().cpu()).abs().max()) for p, q in
                         zip(a.module.parameters(), b.module.parameters())))  # fmt: skip
    return {"steps": steps, "max_abs_weight_diff_per_step": drift,
            "hashes_equal": a.weights_digest() == b.weights_digest()}  # fmt: skip


def peak_per_microbatch(preset: str, device: torch.device, microbatch: int, seq_len: int | None) -> dict[str, Any]:
    """Device memory kept per held microbatch of relay stage 1 (two held), and the peak over their forwards and
    backwards above the stage's own weights, per precision and checkpointing (a fresh stage for each)."""
    cfg = get_preset(preset)
    if seq_len is not None:
        cfg = cfg.replace(seq_len=seq_len)
    out: dict[str, Any] = {"preset": preset, "microbatch": microbatch, "seq_len": cfg.seq_len}
    for precision in ("fp32", "bf16"):
        for ckpt in (False, True):
            module = build_stage(cfg, 1, 0).to(device)
            out["params"] = sum(p.numel() for p in module.parameters())
            r = StageReplica(1, module, OptimConfig(), total_steps=1, precision=precision, checkpointing=ckpt)
            x = torch.randn(microbatch, cfg.seq_len, cfg.d_model).to(r.wire)
            out[f"{precision}{'_ckpt' if ckpt else ''}"] = _held_bytes(r, x, device)
            del r, module
    return out


def _held_bytes(r: StageReplica, x: torch.Tensor, device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {"kept_bytes_per_microbatch": float("nan"), "peak_bytes": float("nan")}
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    for k in range(2):
        r.forward(("d", k, 0), x)
    torch.cuda.synchronize(device)
    held = (torch.cuda.memory_allocated(device) - base) / 2
    for k in range(2):
        r.backward(("d", k, 0), torch.ones_like(x))
    torch.cuda.synchronize(device)
    return {"kept_bytes_per_microbatch": held, "peak_bytes": torch.cuda.max_memory_allocated(device) - base}


def check_memory(device: torch.device, quick: bool) -> dict[str, Any]:
    if quick:
        return {"debug": peak_per_microbatch("debug", device, 2, None)}
    return {"124m": peak_per_microbatch("124m", device, 8, None),
            "1.5b": peak_per_microbatch("1.5b", device, 1, 4096)}  # fmt: skip


async def ack_delay(device: torch.device, quick: bool) -> dict[str, Any]:
    """The event loop's worst lateness on a 1 ms ticker while 8 forwards run in a compute thread."""
    cfg = get_preset("debug" if quick else "124m")
    r = StageReplica(1, build_stage(cfg, 1, 0).to(device), OptimConfig(), total_steps=1, capacity=64)
    x = torch.randn(8 if not quick else 2, cfg.seq_len, cfg.d_model)
    executor = ThreadPoolExecutor(max_workers=1)
    loop = asyncio.get_running_loop()
    worst, running = 0.0, True

    async def ticker() -> None:
        nonlocal worst
        while running:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - t0 - 0.001)

    tick = asyncio.ensure_future(ticker())
    t0 = time.perf_counter()
    for k in range(8):
        await loop.run_in_executor(executor, r.forward, ("d", k, 0), x)
    seconds = time.perf_counter() - t0
    running = False
    await tick
    executor.shutdown()
    return {"forwards": 8, "seconds": seconds, "worst_ack_delay_ms": 1e3 * worst}


def section(name: str, fn: Callable[[], Any], results: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 (one failed check must not hide the others' figures)
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    results[name]["seconds"] = time.perf_counter() - t0
    print(f"{name}: {json.dumps(results[name], default=str)[:600]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, metavar="OUT")
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N (cpu: a smoke run of the same checks)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--only", nargs="+", default=None, metavar="SECTION", help="run these sections only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"gpu_check needs a CUDA GPU: this torch ({torch.__version__}) sees none (--device cpu: a smoke run)")
        Path(args.json).write_text(json.dumps({"cuda": False, "torch": torch.__version__}))
        return 2
    device = resolve_device(args.device)
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    sections: dict[str, Callable[[], Any]] = {
        "swarm_vs_local": lambda: check_swarm_vs_local(device, args.quick),
        "bf16": lambda: check_bf16(device, args.quick),
        "donor_to_cpu": lambda: asyncio.run(donor_to_cpu(str(device), args.quick)),
        "drift": lambda: check_drift(device, args.quick),
        "memory": lambda: check_memory(device, args.quick),
        "ack_delay": lambda: asyncio.run(ack_delay(device, args.quick)),
    }
    for name, fn in sections.items():
        if args.only is None or name in args.only:
            section(name, fn, results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
