"""DeepSpeed's pipeline engine on CPU (gloo), on the same staged modules as gwtf: the static-pipeline baseline.

    python -m gwtf.benchmarks.ds_pipeline --preset debug --stages 4 --steps 12 --warmup 3

S processes, one per pipeline stage, run `deepspeed.pipe.PipelineModule` with the 1F1B training schedule
(`engine.train_batch()`). The layers are gwtf's own modules built from the same seed: gwtf's stage 0 is split into
an embedding layer (first layer) and a norm + LM head layer (last layer) whose loss_fn is gwtf's next-token
cross-entropy; relay stages 1..S sit in between. `partition_method="type:RelayLayer"` gives every pipeline rank one
relay stage, so DeepSpeed's FIRST rank also holds the embedding and its LAST rank also holds the norm and the head
(gwtf keeps both on the data node, a process of its own).

DeepSpeed's first `init_distributed` on CPU JIT-compiles a shared-memory all-reduce op (about 40 s); it serves only
inference all-reduce, never the pipeline's send/recv, so the worker marks it unavailable and skips the build.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DSSettings:
    preset: str = "debug"
    stages: int = 4
    steps: int = 12  # timed steps + warmup
    warmup: int = 3  # untimed first steps (JIT, buffer allocation, first meta exchange)
    microbatch_size: int = 8
    microbatches: int = 8  # per optimizer step (gradient accumulation steps of the pipeline)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.stages < 2:
            raise ValueError(f"a pipeline needs >= 2 stages, got {self.stages}")
        if self.steps <= self.warmup or self.warmup < 0:
            raise ValueError(f"steps ({self.steps}) must exceed warmup ({self.warmup}) >= 0")
        if self.microbatch_size < 1 or self.microbatches < 1:
            raise ValueError("microbatch_size and microbatches must be >= 1")


# --- the layers: gwtf's stage 0 split in two, relay stages unchanged ---------------------------------------------


class EmbedLayer(nn.Module):
    """First pipeline layer: gwtf's stage-0 embedding (tokens -> hidden)."""

    def __init__(self, model_cfg: Any, seed: int) -> None:
        super().__init__()
        from gwtf.models.staged import build_stage

        head: Any = build_stage(model_cfg, 0, seed)
        self.tok_embed, self.pos_embed, self.drop = head.tok_embed, head.pos_embed, head.drop

    def forward(self, input_ids: Tensor) -> Tensor:
        # (batch, seq) -> (batch, seq, d_model), as HeadStage.embed
        hidden = self.tok_embed(input_ids)
        if self.pos_embed is not None:
            hidden = hidden + self.pos_embed(torch.arange(input_ids.shape[1]))[None]
        return self.drop(hidden)


class HeadLayer(nn.Module):
    """Last pipeline layer: gwtf's stage-0 final norm and LM head (hidden -> logits); the loss is `next_token_loss`."""

    def __init__(self, model_cfg: Any, seed: int) -> None:
        super().__init__()
        from gwtf.models.staged import build_stage

        head: Any = build_stage(model_cfg, 0, seed)
        if head.lm_head is None:
            raise ValueError("tied embeddings would need a TiedLayerSpec; the benchmark presets are untied")
        self.norm, self.lm_head = head.norm, head.lm_head

    def forward(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.norm(hidden))  # (batch, seq, vocab)


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """HeadStage.loss on logits: position t predicts labels[t + 1]."""
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


class RelayLayer(nn.Module):
    """gwtf's relay stage k (its decoder layers, same seed, same weights) as one pipeline layer."""

    def __init__(self, model_cfg: Any, k: int, seed: int) -> None:
        super().__init__()
        from gwtf.models.staged import build_stage

        self.stage = build_stage(model_cfg, k, seed)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.stage(hidden)  # (batch, seq, d_model)


# --- one rank --------------------------------------------------------------------------------------------------


def _skip_shm_build() -> None:
    """Mark the CPU shared-memory comm op unavailable: DeepSpeed then never JIT-compiles it (see the docstring)."""
    import deepspeed.ops

    # setting the dict also skips DeepSpeed's probe of every op (compiler subprocesses); other ops read as absent
    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}  # type: ignore[attr-defined]


def _worker(rank: int, settings: DSSettings, port: int, out_path: str) -> None:
    os.environ.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(settings.stages),
        LOCAL_SIZE=str(settings.stages),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule

    from gwtf.config import load_config
    from gwtf.data import MicrobatchSchedule, load_data
    from gwtf.optim import lr_at, make_optimizer, set_lr

    _skip_shm_build()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = load_config(None, [f"preset={settings.preset}", f"stages={settings.stages}", f"train.seed={settings.seed}",
                             f"train.microbatch_size={settings.microbatch_size}",
                             f"train.microbatches_per_step={settings.microbatches}"])  # fmt: skip
    model_cfg = cfg.model_config()
    specs = [LayerSpec(EmbedLayer, model_cfg, settings.seed)]
    specs += [LayerSpec(RelayLayer, model_cfg, k, settings.seed) for k in range(1, model_cfg.n_stages + 1)]
    specs.append(LayerSpec(HeadLayer, model_cfg, settings.seed))
    module = PipelineModule(
        layers=specs,
        num_stages=settings.stages,
        loss_fn=next_token_loss,
        partition_method="type:RelayLayer",
        activation_checkpoint_interval=0,
    )
    optimizer = make_optimizer(module, cfg.optim)  # the same AdamW (groups, betas, eps, foreach=False) as gwtf
    ds_config = {
        "train_micro_batch_size_per_gpu": settings.microbatch_size,
        "gradient_accumulation_steps": settings.microbatches,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)

    data = load_data(cfg.data, model_cfg.seq_len)
    schedule = MicrobatchSchedule(data.train, settings.microbatch_size, settings.microbatches, 1, settings.seed)
    losses: list[float] = []
    t_start = cpu_start = 0.0
    for step in range(settings.steps):
        if step == settings.warmup:
            torch.distributed.barrier()
            t_start, cpu_start = time.perf_counter(), time.process_time()
        set_lr(optimizer, lr_at(step, settings.steps, cfg.optim))
        batch = iter([(x, x) for x in schedule.global_batch(step)])
        loss = engine.train_batch(data_iter=batch)
        losses.append(float(loss))
    torch.distributed.barrier()
    elapsed = time.perf_counter() - t_start
    cpu: list[Any] = [None] * settings.stages  # every rank's CPU seconds (all its threads) in the timed steps
    torch.distributed.all_gather_object(cpu, round(time.process_time() - cpu_start, 3))
    if rank == settings.stages - 1:  # the last stage computes the loss
        timed = settings.steps - settings.warmup
        tokens = timed * settings.microbatches * settings.microbatch_size * model_cfg.seq_len
        result = {
            "tokens_per_s": tokens / elapsed,
            "timed_steps": timed,
            "seconds": elapsed,
            "losses": losses,
            "cpu_seconds_in_timed_steps": {f"rank-{r}": c for r, c in enumerate(cpu)},
            "parts": [int(p) for p in engine.module.parts],  # layer index bounds per rank
        }
        with open(out_path, "w") as fh:
            json.dump(result, fh)
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_deepspeed(settings: DSSettings, out_path: str, timeout: float = 600.0) -> dict[str, Any]:
    """Run the pipeline in `settings.stages` spawned processes; returns the last rank's results."""
    import torch.multiprocessing as mp

    if os.path.exists(out_path):
        os.unlink(out_path)
    ctx = mp.start_processes(
        _worker, args=(settings, free_port(), out_path), nprocs=settings.stages, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"deepspeed pipeline did not finish within {timeout:.0f}s")
    with open(out_path) as fh:
        result: dict[str, Any] = json.load(fh)
    return {**result, "settings": asdict(settings)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f, default in asdict(DSSettings()).items():
        parser.add_argument(f"--{f.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--out", default="ds_pipeline.json")
    args = vars(parser.parse_args())
    out = args.pop("out")
    result = run_deepspeed(DSSettings(**args), out)
    print(f"deepspeed pipeline: {result['tokens_per_s']:.0f} tokens/s over {result['timed_steps']} steps")


if __name__ == "__main__":
    main()
