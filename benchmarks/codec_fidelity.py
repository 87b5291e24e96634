"""Where a wire codec's error goes: one training step with one kind of pipeline tensor quantized, everything else exact.

    python -m gwtf.benchmarks.codec_fidelity --json OUT --from-pretrained SmolLM2.gguf [--codecs channel8 blockwise64]

The model (a checkpoint split into `--stages` relay stages, converted once into `--workdir` as benchmarks.compression
does; or the debug model) runs `--batches` batches of its validation split. For each codec and batch, every stage
boundary's tensors (the embeddings into stage 1, each stage's output, and the gradients coming back) go through the
codec's encode and decode, first the forward activations alone, then the backward gradients alone, rounded as
`gwtf.transport.codecs.WireCodecs` rounds them on the wire (gradients stochastically where the codec does;
`--codecs blockwise64:stochastic` or `channel8:nearest` round its gradients the other way). Printed
per codec and direction: the loss's relative change and the cosine of all parameters' gradient to the exact one
(1 - cosine, float64): how much of a step a codec bends, before training piles it up. benchmarks.compression gives the
losses after training; this says which direction of which codec caused them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any


def _quantizer(spec: str, category: str):
    """x -> decode(encode(x)) as the wire does it for `category` (gwtf.transport.codecs); a codec named
    CODEC:stochastic or CODEC:nearest rounds its gradients so instead (to measure the choice the wire made)."""
    import torch

    from gwtf.transport import codecs

    codec, _, rounding = spec.partition(":")
    stochastic = codecs.rounds_stochastically(codec, category)
    if rounding and category == "gradients":
        stochastic = rounding == "stochastic"
    gen = torch.Generator().manual_seed(0)

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        if codec == "none":  # the exact step against itself: the measurement's own noise
            return x
        return codecs.decode(codecs.encode(x, codec, stochastic, gen), codec, x.dtype, list(x.shape))

    return roundtrip


def _step(stages, batch, forward=None, backward=None):
    """(loss, all parameters' gradient as one float64 vector) of one step, tensors quantized at every boundary."""
    import torch

    class Boundary(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return forward(x) if forward else x

        @staticmethod
        def backward(ctx, g):
            return backward(g) if backward else g

    for stage in stages:
        stage.zero_grad(set_to_none=True)
    hidden = stages[0].embed(batch)
    for stage in stages[1:]:
        hidden = stage(Boundary.apply(hidden))
    loss = stages[0].loss(Boundary.apply(hidden), batch)
    loss.backward()
    grads = [p.grad.reshape(-1).double() for s in stages for p in s.parameters() if p.grad is not None]
    return float(loss), torch.cat(grads)


def measure(stages, batches, codecs: list[str]) -> dict[str, Any]:
    exact = [_step(stages, b) for b in batches]
    results: dict[str, Any] = {}
    for codec in codecs:
        row: dict[str, Any] = {}
        for direction, category in (("forward", "activations"), ("backward", "gradients")):
            q = _quantizer(codec, category)
            gaps, bends = [], []
            for batch, (loss0, grad0) in zip(batches, exact, strict=True):
                loss, grad = _step(stages, batch, **{direction: q})
                gaps.append(loss / loss0 - 1)
                bends.append(1 - float(grad @ grad0 / (grad.norm() * grad0.norm())))
            row[direction] = {"loss_change": statistics.mean(gaps), "one_minus_cosine": statistics.mean(bends)}
        results[codec] = row
        f, b = row["forward"], row["backward"]
        print(f"{codec:>12}: forward loss {f['loss_change']:+.3%}, gradient 1-cos {f['one_minus_cosine']:.2e} | "
              f"backward gradient 1-cos {b['one_minus_cosine']:.2e}", flush=True)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--codecs", nargs="+", default=["bf16", "uint8", "blockwise8", "channel8", "blockwise64"])
    parser.add_argument("--from-pretrained", default=None, metavar="PATH",
                        help="a checkpoint (HF directory, .gguf, staged); default: the debug model")  # fmt: skip
    parser.add_argument("--stages", type=int, default=3, help="relay stages of --from-pretrained")
    parser.add_argument("--workdir", default="runs/compression-pretrained", help="where the checkpoint is converted")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch

    from gwtf.data import DataConfig, load_data

    torch.manual_seed(0)
    if args.from_pretrained:
        from gwtf.models.checkpoint import ensure_staged, load_staged

        staged = ensure_staged(args.from_pretrained, args.stages, args.workdir)
        _, stages, _ = load_staged(staged)
        data = load_data(DataConfig(tokenizer=str(staged)), args.seq_len)
    else:
        from gwtf.models.presets import get_preset
        from gwtf.models.staged import build_stages

        stages = build_stages(get_preset("debug", seq_len=args.seq_len), seed=0)
        data = load_data(DataConfig(), args.seq_len)
    rows = data.val[: args.batches * args.batch_size]
    if len(rows) < args.batches * args.batch_size:
        raise SystemExit(
            f"the validation split has {len(rows)} rows of {args.seq_len}: fewer batches or a shorter --seq-len"
        )
    results = measure(stages, list(rows.split(args.batch_size)), args.codecs)
    out = {"model": args.from_pretrained or "debug", "batches": args.batches, "batch_size": args.batch_size,
           "seq_len": args.seq_len, "results": results}  # fmt: skip
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
