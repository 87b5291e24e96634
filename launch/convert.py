"""`gwtf convert` (a HF directory or GGUF file into a staged checkpoint) and `gwtf export` (a staged checkpoint, or a
live run's model, as a Hugging Face directory).

    gwtf convert --from SmolLM2.gguf --to staged/ --stages 3
    gwtf export --from staged/ --to hf/
    gwtf export --run myrun --initial-peers ADDR --to hf/
    gwtf export --run myrun --initial-peers ADDR --to adapter/ --adapter-only     # a LoRA run's peft adapter
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gwtf.errors import UserError
from gwtf.launch.export_run import export_run
from gwtf.models.checkpoint import _load_pretrained, _read_manifest, export_hf, load_staged, save_staged, weights_hash


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    source_help = "HF model directory or .gguf file" if command == "convert" else "staged checkpoint directory"
    parser.add_argument("--from", dest="src", required=command == "convert", help=source_help)
    parser.add_argument("--to", dest="dst", required=True, help="output directory (must be new or empty)")
    if command == "convert":
        parser.add_argument("--stages", type=int, default=None, help="relay stages (default: largest divisor <= 8)")
        parser.add_argument(
            "--equal-stages", action="store_true", help="refuse uneven splits (needed by CheckFree recovery)"
        )
    else:
        parser.add_argument("--run", default=None, help="export a live run instead (with --initial-peers)")
        parser.add_argument("--initial-peers", nargs="+", default=None, metavar="ADDR", help="a multiaddr of the run")
        parser.add_argument("--key", default=None, metavar="FILE", help="the run key, for a run by invitation")
        parser.add_argument("--adapter-only", action="store_true",
                            help="a LoRA run: write its peft adapter directory instead of merged weights")  # fmt: skip
        parser.add_argument("--weights-only", action="store_true",
                            help="a live run: leave out its state (DIR/state: weights, Adam moments and step, what "
                            "`gwtf bootstrap --resume DIR` goes on from; about 3x the weights)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args._command == "convert":
        return _run_convert(args)
    return _run_export(args)


def _run_convert(args: argparse.Namespace) -> int:
    cfg, stages, tokenizer, source = _load_pretrained(Path(args.src), args.stages, args.equal_stages)
    out = save_staged(stages, cfg, args.dst, tokenizer=tokenizer, source=source)
    split = "+".join(str(len(r)) for r in cfg.layer_ranges())
    print(
        f"wrote {out}: {cfg.family}, {cfg.n_layers} layers in {cfg.n_stages} stages ({split}), "
        f"config {cfg.config_hash()}, weights {weights_hash(stages)}"
        + ("" if tokenizer is not None else ", no tokenizer")
    )
    return 0


def _run_export(args: argparse.Namespace) -> int:
    if args.run:
        if not args.initial_peers:
            raise UserError("--run needs --initial-peers (the address `gwtf bootstrap` printed)")
        out, version = export_run(args.initial_peers, args.run, args.dst, args.key, adapter_only=args.adapter_only,
                                  with_state=not args.weights_only)  # fmt: skip
        what = f"peft adapter of run {args.run}" if args.adapter_only else f"Hugging Face model of run {args.run}"
        resume = "" if args.weights_only else f"; its state at step {version} in {out}/state (--resume {out})"
        print(f"wrote {out}: {what} at step {version}{resume}")
        return 0
    if args.adapter_only:
        raise UserError("--adapter-only exports a live LoRA run's adapters: give --run NAME --initial-peers ADDR")
    if not args.src:
        raise UserError("give --from STAGED_DIR, or --run NAME --initial-peers ADDR to export a live run")
    root = Path(args.src)
    cfg, stages, tokenizer = load_staged(root)
    special = _read_manifest(root).get("special_tokens", {})
    out = export_hf(stages, cfg, args.dst, tokenizer=tokenizer, special_tokens=special)
    print(f"wrote {out}: Hugging Face {cfg.family} model, {cfg.n_layers} layers, weights {weights_hash(stages)}")
    return 0
