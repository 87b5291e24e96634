"""`gwtf train-local`: the single-process reference training every swarm result is compared with.

gwtf train-local --config run.toml --set optim.lr=1e-3 --set train.microbatch_size=16 --json out.json
gwtf train-local --preset debug --set train.precision=bf16   # computes and rounds as a bf16 swarm does
"""

from __future__ import annotations

import argparse

from gwtf.config import load_config
from gwtf.tensorboard import check_logdir
from gwtf.trainer import train_local


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", help="run config TOML ([data], [optim], [train], [model] tables)")
    parser.add_argument("--preset", help="model preset (default: debug)")
    parser.add_argument("--stages", type=int, help="relay stages (default: the preset's)")
    parser.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    parser.add_argument("--seed", type=int, help="model init and batch order seed (train.seed)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set optim.lr=1e-3 (repeatable)")  # fmt: skip
    parser.add_argument("--data-nodes", type=int, default=1, help="number of data nodes the batches are dealt to")
    parser.add_argument("--json", help="write the results (losses, val loss, tokens/s, config) here")
    parser.add_argument("--metrics", help="append per-step JSON lines here")
    parser.add_argument("--tensorboard", metavar="DIR", help="TensorBoard scalars into DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    flags = {"preset": args.preset, "stages": args.stages, "train.steps": args.steps, "train.seed": args.seed}
    overrides = [*args.set, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    cfg = load_config(args.config, overrides)
    if args.tensorboard is not None:
        check_logdir(args.tensorboard)
    result = train_local(cfg, args.json, progress=not args.no_progress, n_data_nodes=args.data_nodes,
                         metrics_path=args.metrics, tensorboard_dir=args.tensorboard)  # fmt: skip
    losses = result["losses"]
    print(
        f"steps {len(losses)}  loss {losses[0]:.4f} -> {losses[-1]:.4f}  val_loss {result['val_loss']:.4f}  "
        f"tokens/s {result['tokens_per_s']:.0f}  params {result['params_hash']}"
    )
    return 0
