"""`gwtf finetune`: fine-tune a pretrained checkpoint on a local swarm (a relay crashes mid-run) and export it.

    gwtf finetune --from-pretrained SmolLM2-135M-Instruct.Q4_1.gguf --data notes/ --stages 3 --replicas 2 \\
        --steps 20 --out runs/ft

The checkpoint (HF directory, .gguf file or staged checkpoint) is converted into OUT/staged; the swarm's first
replicas load their stages from it, later ones from live replicas; one relay SIGKILLs itself at `--crash-at` and a
volunteer takes over. When the data nodes are done, the model is fetched from the live swarm and written to OUT/hf,
a Hugging Face directory with the tokenizer. The validation loss on the corpus before and after is in
OUT/finetune.json.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from gwtf.config import RunConfig, load_config
from gwtf.errors import UserError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, command: str = "finetune") -> None:
    parser.add_argument("--from-pretrained", required=True, metavar="PATH", help="HF dir, .gguf or staged checkpoint")
    parser.add_argument("--data", required=True, metavar="PATH", help="the corpus: a text file or a folder of them")
    parser.add_argument("--stages", type=int, default=3, help="relay stages")
    parser.add_argument("--replicas", type=int, default=2, help="replicas per relay stage")
    parser.add_argument("--data-nodes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crash-at", type=int, default=5, help="step at which a relay crashes (-1: never)")
    parser.add_argument("--crash-stage", type=int, default=1)
    parser.add_argument("--crash-phase", default="backward")
    parser.add_argument("--router", default="gwtf-p2p")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config override")
    parser.add_argument("--out", required=True, help="output folder: staged/, hf/, swarm/ logs, finetune.json")
    parser.add_argument("--timeout", type=float, default=1800.0)


def run(args: argparse.Namespace) -> int:
    from gwtf.launch import local_swarm
    from gwtf.launch.bootstrap import FINETUNE_DEFAULTS
    from gwtf.models.checkpoint import ensure_staged

    out = Path(args.out)
    if (out / "hf").exists() and any((out / "hf").iterdir()):
        raise UserError(f"{out / 'hf'} exists and is not empty; choose another --out")
    settings = [f"model.seq_len={args.seq_len}", *args.set]
    swarm_args = argparse.Namespace(
        preset="debug", stages=args.stages, replicas=args.replicas, data_nodes=args.data_nodes, steps=args.steps,
        seed=args.seed, crash_at=args.crash_at, crash_stage=args.crash_stage, crash_phase=args.crash_phase,
        router=args.router, set=settings, out=str(out / "swarm"), timeout=args.timeout,
    )  # fmt: skip
    local_swarm.check_args(swarm_args, pretrained=True)  # before the checkpoint is converted or anything starts
    staged = ensure_staged(args.from_pretrained, args.stages, out / "staged").resolve()
    cfg = run_config(staged, args.data, [*FINETUNE_DEFAULTS, *settings, f"train.seed={args.seed}"])
    before = validation_loss(cfg, _staged_stages(staged))
    print(f"validation loss of {Path(args.from_pretrained).name} before fine-tuning: {before:.4f}")

    extras = local_swarm.SwarmExtras(
        bootstrap=["--from-pretrained", str(staged), "--data", args.data],
        data=["--linger"],
        after_done=lambda peers, run_id: export_final(peers, run_id, out),
        run_prefix="finetune",
    )
    code = local_swarm.run(swarm_args, extras)
    summary = json.loads((out / "swarm" / "summary.json").read_text())
    if code != 0 or "exported" not in summary:
        raise UserError(f"the fine-tuning swarm did not finish; see {out / 'swarm'}")
    after = validation_loss(cfg, _hf_stages(out / "hf", cfg))
    kept = ("exported", "weights_hash", "losses", "microbatches", "crash")
    result = {"val_loss_before": before, "val_loss_after": after, **{k: summary[k] for k in kept}}
    (out / "finetune.json").write_text(json.dumps(result, indent=1))
    print(f"validation loss {before:.4f} -> {after:.4f}; Hugging Face model in {out / 'hf'}")
    return 0


def export_final(peers: list[str], run_id: str, out: Path) -> dict:
    """The swarm's final model, fetched once from its live nodes: OUT/final-staged and OUT/hf (Hugging Face)."""
    import asyncio

    from gwtf.launch.export_run import fetch_run, tokenizer_of
    from gwtf.models.checkpoint import export_hf, save_staged, weights_hash

    cfg, model, stages, version = asyncio.run(fetch_run(peers, run_id))
    tokenizer, special = tokenizer_of(cfg)
    save_staged(stages, model, out / "final-staged", tokenizer=tokenizer, source={"special_tokens": special})
    export_hf(stages, model, out / "hf", tokenizer=tokenizer, special_tokens=special)
    return {"exported": str(out / "hf"), "version": version, "weights_hash": weights_hash(stages)}


def run_config(staged: Path, data: str, overrides: list[str]) -> RunConfig:
    cfg = load_config(None, overrides)
    cfg.pretrained, cfg.data.tokenizer = str(staged), str(staged)
    cfg.data.corpus = str(Path(data).resolve())
    return cfg


def validation_loss(cfg: RunConfig, stages) -> float:
    """Mean loss over the corpus's held-out validation rows, through the composed stages."""
    from gwtf.data import load_data
    from gwtf.trainer import evaluate

    data = load_data(cfg.data, cfg.model_config().seq_len)
    if len(data.val) == 0:
        raise UserError(f"{cfg.data.corpus} is too small to hold out validation rows; give more text")
    return evaluate(stages, data.val, cfg.train.microbatch_size, cfg.train.val_batches)


def _staged_stages(staged: Path):
    from gwtf.models.checkpoint import load_staged

    return load_staged(staged)[1]


def _hf_stages(hf_dir: Path, cfg: RunConfig):
    from transformers import AutoModelForCausalLM

    from gwtf.models.staged import stages_from_hf

    return stages_from_hf(AutoModelForCausalLM.from_pretrained(str(hf_dir)), cfg.model_config())
