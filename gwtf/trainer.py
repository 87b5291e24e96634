"""Single-process reference training: the whole pipeline in one process, the yardstick for every swarm run.

    gwtf train-local --preset debug --steps 200 --seed 0 --json out.json
    python -m gwtf.launch.cli train-local --config run.toml --set optim.lr=1e-3 --set train.microbatch_size=16

The order of operations, which a swarm with one data node and one replica per stage reproduces exactly:

    for step in 0..steps-1:
        lr = lr_at(step, steps); set on every stage's optimizer; zero every gradient
        for x in schedule.global_batch(step):                # microbatches, rank order, then microbatch order
            h = stage0.embed(x); h = stage_k(h) for k = 1..S
            loss_x = stage0.loss(h, x)                       # mean next-token cross-entropy of the microbatch
            (loss_x / n_microbatches).backward()             # gradients accumulate: their sum is the mean's
        every stage's optimizer steps (stage 0 first, then 1..S; they are independent)
        step loss = sum of the loss_x values (Python floats) / n_microbatches

Validation runs after the update of every `eval_every`-th step and after the last step, on the first
`val_batches` microbatches of the held-out rows; it is recorded as [steps done, loss].
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from gwtf.config import RunConfig, to_dict
from gwtf.data import MicrobatchSchedule, PackedData, Tokenizer, load_data, load_tokenizer
from gwtf.device import autocast, on_the_wire
from gwtf.errors import UserError
from gwtf.metrics import MetricsWriter
from gwtf.optim import lr_at, make_optimizer, set_lr
from gwtf.tensorboard import ITERATION_TAGS, ScalarBoard

logger = logging.getLogger(__name__)


def pipeline_loss(stages: list[nn.Module], x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Mean next-token loss of microbatch x (batch, seq) through stage 0, stages 1..S and back to stage 0. In bf16
    as a swarm computes it: each stage under autocast, activations and their gradients rounded to bf16 between
    stages (where a swarm's messages carry them), each stage's input back in fp32."""
    head: Any = stages[0]  # models.staged.HeadStage
    with autocast(x.device, precision):
        hidden = head.embed(x)  # (batch, seq, d_model)
    for stage in [*stages[1:], None]:
        hidden = on_the_wire(hidden, precision)
        with autocast(x.device, precision):
            hidden = head.loss(hidden, x) if stage is None else stage(hidden)
    return hidden


@torch.no_grad()
def evaluate(
    stages: list[nn.Module], val: torch.Tensor, microbatch_size: int, max_batches: int, precision: str = "fp32"
) -> float:
    """Mean loss over the first `max_batches` microbatches of the validation rows."""
    for stage in stages:
        stage.eval()
    batches = val[: max_batches * microbatch_size].split(microbatch_size)
    losses = [pipeline_loss(stages, x, precision).item() for x in batches]
    for stage in stages:
        stage.train()
    return sum(losses) / len(losses)


def train_step(
    stages: list[nn.Module],
    opts: Sequence[torch.optim.Optimizer],
    batch: list[torch.Tensor],
    lr: float,
    precision: str = "fp32",
) -> float:
    """One optimizer step over the microbatches of `batch` (order in the module docstring), in `precision` (the
    run's train.precision: fp32 master weights either way); returns the mean loss."""
    for opt in opts:
        set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
    total = 0.0
    for x in batch:
        loss = pipeline_loss(stages, x, precision)
        (loss / len(batch)).backward()
        total += loss.item()
    for opt in opts:
        opt.step()
    return total / len(batch)


def params_hash(stages: list[nn.Module]) -> str:
    """sha256 over every stage's parameters in order: equal hashes mean bit-identical models."""
    h = hashlib.sha256()
    for stage in stages:
        for name, p in stage.state_dict().items():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}; "
            f"set model.vocab_size={tokenizer.vocab_size} or use a matching tokenizer"
        )


def train_local(
    cfg: RunConfig,
    json_out: str | None = None,
    progress: bool = True,
    n_data_nodes: int = 1,
    metrics_path: str | None = None,
    data: PackedData | None = None,
    tensorboard_dir: str | None = None,
) -> dict[str, Any]:
    """Train cfg's model on cfg's data in this process; returns (and writes to json_out) the results, and with
    `tensorboard_dir` the same scalars as a data node's (gwtf.tensorboard)."""
    from gwtf.models.staged import build_stages

    model_cfg = cfg.model_config()
    tr = cfg.train
    if data is None:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        _check_vocab(tokenizer, model_cfg.vocab_size)
        data = load_data(cfg.data, model_cfg.seq_len, tokenizer)
    schedule = MicrobatchSchedule(data.train, tr.microbatch_size, tr.microbatches_per_step, n_data_nodes, tr.seed)
    if cfg.pretrained:  # fine-tuning: the checkpoint's weights, as every first replica of a swarm loads them
        from gwtf.models.checkpoint import load_staged

        stages = load_staged(cfg.pretrained)[1]
    else:
        stages = build_stages(model_cfg, tr.seed)
    opts = [make_optimizer(stage, cfg.optim) for stage in stages]
    tokens_per_step = tr.microbatches_per_step * tr.microbatch_size * model_cfg.seq_len

    losses: list[float] = []
    val_losses: list[list[float]] = []
    train_time = 0.0
    with MetricsWriter(metrics_path) as metrics, ScalarBoard(tensorboard_dir) as board:
        bar = tqdm(range(tr.steps), desc="train-local", disable=not progress, unit="step")
        for step in bar:
            start = time.perf_counter()
            lr = lr_at(step, tr.steps, cfg.optim)
            loss = train_step(stages, opts, schedule.global_batch(step), lr, tr.precision)
            seconds = time.perf_counter() - start
            train_time += seconds
            losses.append(loss)
            metrics.write(event="step", step=step, loss=loss, lr=lr)
            board.iteration({"iteration": step, "loss": loss, "seconds": seconds,
                             "tokens_per_s": tokens_per_step / max(seconds, 1e-9)})  # fmt: skip
            bar.set_postfix(loss=f"{loss:.3f}")
            done = step + 1
            if done == tr.steps or (tr.eval_every and done % tr.eval_every == 0):
                val = evaluate(stages, data.val, tr.microbatch_size, tr.val_batches, tr.precision)
                val_losses.append([done, val])
                metrics.write(event="val", step=done, val_loss=val)
                board.add(done, {ITERATION_TAGS["val_loss"]: val})
        bar.close()

    result = {
        "losses": losses,
        "val_loss": val_losses[-1][1],
        "val_losses": val_losses,
        "tokens_per_s": tokens_per_step * tr.steps / max(train_time, 1e-9),
        "tokens_per_step": tokens_per_step,
        "n_data_nodes": n_data_nodes,
        "config": to_dict(cfg),
        "model_hash": model_cfg.config_hash(),
        "params_hash": params_hash(stages),
        "corpus_hash": data.corpus_hash,
    }
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1))
    return result
