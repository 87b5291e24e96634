"""One rank of the DeepSpeed baseline (its own process), started by benchmarks.harness.deepspeed_run:

    python -m gwtf.benchmarks.harness.deepspeed_rank --rank R --world W --port P --settings JSON

Builds gwtf's stage modules into a `deepspeed.pipe.PipelineModule` (benchmarks.ds_pipeline has the layers), resumes
from the run's latest checkpoint if there is one, emulates its machine's compute speed and links, trains the rest
of the steps and checkpoints every `checkpoint_every`; the last stage's first rank writes the metrics lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _worker(rank: int, world: int, port: int, s: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    import torch

    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule

    from gwtf.benchmarks.ds_pipeline import EmbedLayer, HeadLayer, _skip_shm_build, next_token_loss
    from gwtf.config import load_config
    from gwtf.data import MicrobatchSchedule, load_data
    from gwtf.optim import lr_at, make_optimizer, set_lr

    _skip_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    stages, dp = s["stages"], s["dp"]
    cfg = load_config(None, [f"preset={s['preset']}", f"stages={stages}", f"train.seed={s['seed']}", *s["overrides"]])
    model_cfg, t = cfg.model_config(), cfg.train
    per_pipe = t.microbatches_per_step // dp
    stage_of_rank = rank // dp  # DeepSpeed's PipeDataParallelTopology: rank = stage * dp + data-parallel index
    me = s["placement"][f"{stage_of_rank + 1},{rank % dp}"]
    forward_s = s["compute_ms"] / 1000 / me["speed"]
    SlowRelay = _make_slow_relay()  # noqa: N806 (a class; built here so that importing this module stays light)
    specs = [LayerSpec(EmbedLayer, model_cfg, s["seed"])]
    specs += [LayerSpec(SlowRelay, model_cfg, k, s["seed"], forward_s) for k in range(1, model_cfg.n_stages + 1)]
    specs.append(LayerSpec(HeadLayer, model_cfg, s["seed"]))
    module = PipelineModule(layers=specs, num_stages=stages, loss_fn=next_token_loss,
                            partition_method="type:SlowRelay", activation_checkpoint_interval=0)  # fmt: skip
    optimizer = make_optimizer(module, cfg.optim)
    ds_config = {"train_micro_batch_size_per_gpu": t.microbatch_size, "gradient_accumulation_steps": per_pipe,
                 "train_batch_size": t.microbatch_size * per_pipe * dp, "steps_per_print": 1 << 30}  # fmt: skip
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    assert engine.grid.get_stage_id() == stage_of_rank and engine.grid.get_data_parallel_id() == rank % dp
    _emulate_links(engine, s, stage_of_rank, rank % dp)

    start = 0
    if (Path(s["checkpoint_dir"]) / "latest").exists():
        _, client = engine.load_checkpoint(s["checkpoint_dir"])
        start = int(client["step"]) if client else 0
    data = load_data(cfg.data, model_cfg.seq_len)
    schedule = MicrobatchSchedule(data.train, t.microbatch_size, t.microbatches_per_step, 1, s["seed"])
    writes = stage_of_rank == stages - 1 and rank % dp == 0
    tokens = t.microbatches_per_step * t.microbatch_size * model_cfg.seq_len
    for step in range(start, s["steps"]):
        began = time.time()
        set_lr(optimizer, lr_at(step, s["steps"], cfg.optim))
        mine = schedule.global_batch(step)[(rank % dp) * per_pipe : (rank % dp + 1) * per_pipe]
        loss = float(engine.train_batch(data_iter=iter([(x, x) for x in mine])))
        if (step + 1) % s["checkpoint_every"] == 0 and step + 1 < s["steps"]:
            engine.save_checkpoint(s["checkpoint_dir"], tag=f"step{step + 1}", client_state={"step": step + 1})
        if writes:
            now = time.time()
            row = {"time": now, "event": "iteration", "iteration": step, "loss": loss, "seconds": now - began,
                   "tokens_per_s": tokens / (now - began), "started": t.microbatches_per_step,
                   "finished": t.microbatches_per_step, "rerouted": 0, "partial": 0, "lost": 0,
                   "live_per_stage": [dp] * stages, "attempt": s["attempt"]}  # fmt: skip
            _append(s["metrics"], row)
    torch.distributed.barrier()
    if writes:
        _append(s["metrics"], {"time": time.time(), "event": "done"})
    torch.distributed.destroy_process_group()


def _append(path: str, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _sleep_in_backward(seconds: float) -> Any:
    import torch

    class SleepInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            return x.view_as(x)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            time.sleep(seconds)
            return grad

    return SleepInBackward.apply


def _make_slow_relay() -> type:
    from gwtf.benchmarks.ds_pipeline import RelayLayer

    class SlowRelay(RelayLayer):
        """gwtf's relay stage k with a device `speed` times the base one: sleeps as the harness's relays do
        (benchmarks.harness.emulated_node)."""

        def __init__(self, model_cfg: Any, k: int, seed: int, forward_s: float) -> None:
            super().__init__(model_cfg, k, seed)
            self.forward_s = forward_s
            self.slow_backward = _sleep_in_backward(2 * forward_s)

        def forward(self, hidden: Any) -> Any:
            out = super().forward(hidden)
            if self.forward_s > 0:
                time.sleep(self.forward_s)
                out = self.slow_backward(out)
            return out

    return SlowRelay


def _emulate_links(engine: Any, s: dict, stage: int, d: int) -> None:
    """Pipeline sends carry their send time; receives wait for latency + bytes / bandwidth of the regions' link.
    The gradient all-reduce over the data-parallel group waits for a ring all-reduce on its slowest link."""
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.pipe import p2p

    from gwtf.transport import LinkEmulator

    links = LinkEmulator()
    region = {tuple(map(int, key.split(","))): spec["region"] for key, spec in s["placement"].items()}
    mine = region[(stage + 1, d)]
    send, recv = p2p.send, p2p.recv

    def timed_send(tensor: Any, dest_stage: int, async_op: bool = False) -> Any:
        dist.send(torch.tensor([time.time()], dtype=torch.float64), p2p._grid.stage_to_global(stage_id=dest_stage))
        return send(tensor, dest_stage, async_op)

    def timed_recv(tensor: Any, src_stage: int, async_op: bool = False) -> Any:
        stamp = torch.zeros(1, dtype=torch.float64)
        dist.recv(stamp, p2p._grid.stage_to_global(stage_id=src_stage))
        out = recv(tensor, src_stage, async_op)
        latency, bandwidth = links.link(region[(src_stage + 1, d)], mine)
        wait = float(stamp[0]) + latency + tensor.numel() * tensor.element_size() / bandwidth - time.time()
        if wait > 0:
            time.sleep(wait)
        return out

    p2p.send, p2p.recv = timed_send, timed_recv
    group = [region[(stage + 1, j)] for j in range(s["dp"])]
    if len(group) > 1:
        nbytes = sum(p.numel() * p.element_size() for p in engine.module.parameters())
        worst = [links.link(a, b) for i, a in enumerate(group) for j, b in enumerate(group) if i != j]
        latency, bandwidth = max(w[0] for w in worst), min(w[1] for w in worst)
        n = len(group)
        ring_s = 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / bandwidth
        original = engine.allreduce_gradients

        def slow_allreduce(*args: Any, **kwargs: Any) -> Any:
            began = time.time()
            out = original(*args, **kwargs)
            time.sleep(max(0.0, ring_s - (time.time() - began)))
            return out

        engine.allreduce_gradients = slow_allreduce


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gwtf.benchmarks.harness.deepspeed_rank",
                                     description="one rank of the DeepSpeed baseline")  # fmt: skip
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--settings", required=True)
    args = parser.parse_args(argv)
    _worker(args.rank, args.world, args.port, json.loads(args.settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
