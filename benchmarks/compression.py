"""Wire codecs against fp32: bytes per microbatch, the loss after N steps, the iteration time over emulated links.

    nice -n 19 python -m gwtf.benchmarks.compression --json OUT [--steps 200] [--codecs none uint8 blockwise8]
        [--links geo10] [--d-model 256]
    python -m gwtf.benchmarks.compression --json OUT --from-pretrained SmolLM2.gguf --steps 30 \
        --set model.seq_len=64 --set train.microbatch_size=2 --set train.microbatches_per_step=2

One in-process swarm per codec (debug preset, 3 stages, one replica each, the same seed and data), the codec on
activations and gradients (`wire.activations`, `wire.gradients`; gradients round stochastically in blockwise8).
Frames are really encoded and decoded, so the bytes are those on the wire (headers included), counted per message
kind by the transports. `--links geo10` puts the data node in Iowa and the stages in Oregon, London and Japan with
the region table's latency and bandwidth (gwtf.transport.LinkEmulator), so the iteration time shows what the bytes
cost on slow links. Printed per codec: bytes per microbatch and its ratio to fp32's, the last loss (mean of the last
5 steps) and its relative gap to fp32's, the median iteration time and its ratio to fp32's.

`--from-pretrained PATH` (an HF directory, a .gguf file or a staged checkpoint) fine-tunes that checkpoint instead,
split into `--stages` relay stages (converted once into `--workdir`), with the fine-tuning defaults of `gwtf
bootstrap --from-pretrained` (gwtf.launch.bootstrap.FINETUNE_DEFAULTS), on `--data` or the embedded corpus in its
own tokenizer: the codecs' loss gap on a real model, where activations are not the debug model's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

RUN = "codec-bench"
KINDS = ("forward", "head", "backward", "embed_grad")  # the pipeline's tensors, both ways
GEO10 = {"data-0": "Iowa", 1: "Oregon", 2: "London", 3: "Japan"}  # data node and each stage's region


async def _run(codec: str, args: argparse.Namespace) -> dict[str, Any]:
    from gwtf.config import load_config
    from gwtf.data import load_data
    from gwtf.membership import InMemoryMembership
    from gwtf.runtime.assembly import make_data_node, module_builder
    from gwtf.runtime.relay import RelayNode
    from gwtf.runtime.spec import NodeOptions, run_spec
    from gwtf.transport import InProcessNetwork, InProcessTransport, LinkEmulator

    model = [] if args.staged else ["preset=debug", "stages=3"]
    overrides = [*model, f"train.steps={args.steps}", "train.seed=0", "train.eval_every=0",
                 "membership.heartbeat_s=1.0", "membership.record_ttl_s=30.0", "transport.call_timeout=60",
                 f"wire.activations={codec}", f"wire.gradients={codec}", *args.set]  # fmt: skip
    if args.d_model:
        overrides.append(f"model.d_model={args.d_model}")
    if args.staged:  # as `gwtf bootstrap --from-pretrained` sets a run up (its fine-tuning defaults, then --set)
        from gwtf.launch.bootstrap import FINETUNE_DEFAULTS

        cfg = load_config(None, overrides, defaults=FINETUNE_DEFAULTS)
        cfg.pretrained, cfg.stages, cfg.data.tokenizer = args.staged, None, args.staged
        if args.data:
            cfg.data.corpus = args.data
        cfg.model_config()
    else:
        cfg = load_config(None, overrides)
    spec = run_spec(RUN, cfg, 1)
    network, store = InProcessNetwork(), InMemoryMembership.shared_store()
    emulator = LinkEmulator() if args.links == "geo10" else None
    regions = GEO10 if emulator else {}
    nodes: list = []
    for stage in range(1, spec.model.n_stages + 1):
        name = f"relay-{stage}"
        transport = InProcessTransport(network, name, RUN, regions.get(stage), emulator)
        node = RelayNode(spec, transport, InMemoryMembership(store, RUN, name), NodeOptions(capacity=4), stage)
        nodes.append(node)
        await node.start(module_builder(spec))
    transport = InProcessTransport(network, "data-0", RUN, regions.get("data-0"), emulator)
    data = make_data_node(spec, transport, InMemoryMembership(store, RUN, "data-0"), NodeOptions(), 0,
                          load_data(cfg.data, spec.model.seq_len))  # fmt: skip
    nodes.append(data)
    try:
        await data.start(expected_data_nodes=1, timeout=60)
        losses, seconds = [], []
        for _ in range(args.steps):
            report = await data.run_iteration()
            losses.append(report.loss)
            seconds.append(report.seconds)
        sent = sum(n.transport.wire["sent"][k] for n in nodes for k in KINDS)
        microbatches = args.steps * cfg.train.microbatches_per_step
        return {"bytes_per_microbatch": sent / microbatches, "losses": losses,
                "final_loss": statistics.mean(losses[-5:]), "iteration_s": statistics.median(seconds)}  # fmt: skip
    finally:
        for node in nodes:
            await node.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--codecs", nargs="+", default=["none", "fp16", "bf16", "uint8", "blockwise8"])
    parser.add_argument("--links", choices=("none", "geo10"), default="none", help="emulate geo10's regions' links")
    parser.add_argument("--d-model", type=int, default=0, help="override the debug model's width (bigger messages)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config override")
    parser.add_argument("--from-pretrained", default=None, metavar="PATH",
                        help="fine-tune this checkpoint (HF directory, .gguf, staged), not the debug "
                        "model")  # fmt: skip
    parser.add_argument("--stages", type=int, default=3, help="relay stages of --from-pretrained")
    parser.add_argument("--data", default=None, metavar="PATH", help="--from-pretrained: the corpus (default embedded)")
    parser.add_argument("--workdir", default="runs/compression-pretrained", help="where the checkpoint is converted")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    args.staged = None
    if args.from_pretrained:
        from gwtf.models.checkpoint import ensure_staged

        args.staged = str(ensure_staged(args.from_pretrained, args.stages, args.workdir).resolve())
    codecs = ["none", *(c for c in args.codecs if c != "none")]  # fp32 first: every ratio is to it
    results: dict[str, Any] = {}
    for codec in codecs:
        start = time.perf_counter()
        results[codec] = asyncio.run(_run(codec, args))
        base = results["none"]
        r = results[codec]
        r["bytes_ratio"] = r["bytes_per_microbatch"] / base["bytes_per_microbatch"]
        r["loss_gap"] = (r["final_loss"] - base["final_loss"]) / base["final_loss"]
        r["time_ratio"] = r["iteration_s"] / base["iteration_s"]
        print(f"{codec:>10}: {r['bytes_per_microbatch'] / 2**10:9.1f} KiB/microbatch (x{r['bytes_ratio']:.3f})  "
              f"loss {r['final_loss']:.4f} ({r['loss_gap']:+.2%})  iteration {r['iteration_s']:.3f}s "
              f"(x{r['time_ratio']:.2f})  [{time.perf_counter() - start:.0f}s]", flush=True)  # fmt: skip
    out = {"steps": args.steps, "links": args.links, "d_model": args.d_model or None,
           "model": args.from_pretrained or "debug", "settings": args.set, "results": results}  # fmt: skip
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
