"""`gwtf finetune`: fine-tune a pretrained checkpoint on a local swarm (a relay crashes mid-run) and export it.

    gwtf finetune --from-pretrained SmolLM2-135M-Instruct.Q4_1.gguf --data notes/ --stages 3 --replicas 2 \\
        --steps 20 --out runs/ft

The checkpoint (HF directory, .gguf file or staged checkpoint) is converted into OUT/staged; the swarm's first
replicas load their stages from it, later ones from live replicas; one relay SIGKILLs itself at `--crash-at` and a
volunteer takes over. When the data nodes are done, the model is fetched from the live swarm and written to OUT/hf,
a Hugging Face directory with the tokenizer. The validation loss on the corpus before and after is printed and
kept in OUT/finetune.json, with greedy completions of the prompts in `--prompts FILE` (one a line) before and after.

    gwtf finetune --from-pretrained SmolLM2.gguf --data chats.jsonl --lora r=16,alpha=32,targets=q_proj,v_proj \
        --prompts prompts.txt --out runs/ft-lora
    gwtf finetune --resume runs/ft-lora --data more.jsonl --steps 20 --out runs/ft-lora-2

`--data` takes a text file (its paragraphs are documents), a folder of text files, JSON lines / JSON / CSV / Parquet
rows (`text`; chat `messages`; `prompt` and `completion`) or a `datasets.save_to_disk` folder (gwtf.data).
`--lora` trains peft LoRA adapters on a frozen base across the swarm (gwtf.lora); OUT/hf has them merged in and
OUT/adapter is the peft adapter directory (`--adapter-only`: that alone). `--resume DIR` starts from DIR's last
export (DIR/final-staged: the weights, adapters merged in), else from DIR's staged copy: the weights carry over, the
optimizer's moments and the schedule's position do not (a new warmup; the export holds weights only).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from gwtf.config import RunConfig, load_config
from gwtf.errors import UserError
from gwtf.lora import parse_lora

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, command: str = "finetune") -> None:
    parser.add_argument("--from-pretrained", default=None, metavar="PATH", help="HF dir, .gguf or staged checkpoint")
    parser.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="a text file, a folder of them, rows (.jsonl .json .csv .parquet) or a saved dataset",
    )
    parser.add_argument(
        "--lora",
        default=None,
        metavar="SPEC",
        help="LoRA adapters, e.g. r=16,alpha=32,targets=q_proj,v_proj (default: every weight)",
    )
    parser.add_argument("--adapter-only", action="store_true", help="with --lora: write OUT/adapter, not OUT/hf")
    parser.add_argument("--prompts", default=None, metavar="FILE", help="prompts (one a line) to complete before/after")
    parser.add_argument("--resume", default=None, metavar="DIR", help="a previous --out: continue from its last export")
    parser.add_argument("--stages", type=int, default=3, help="relay stages")
    parser.add_argument("--replicas", type=int, default=2, help="replicas per relay stage")
    parser.add_argument("--data-nodes", type=int, default=1, help="data nodes that drive the run")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (data order, new weights)")
    parser.add_argument("--crash-at", type=int, default=5, help="step at which a relay crashes (-1: never)")
    parser.add_argument("--crash-stage", type=int, default=1, help="stage of the relay that crashes")
    parser.add_argument("--crash-phase", default="backward", help="phase of the crash (gwtf.faults.PHASES)")
    parser.add_argument("--router", default="gwtf-p2p", help="routing.router of the run")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N for every local node")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config override")
    parser.add_argument("--out", required=True, help="output folder: staged/, hf/, swarm/ logs, finetune.json")
    parser.add_argument("--timeout", type=float, default=1800.0, help="the whole swarm run, seconds")


def run(args: argparse.Namespace) -> int:
    from gwtf.launch import local_swarm
    from gwtf.launch.bootstrap import FINETUNE_DEFAULTS
    from gwtf.models.checkpoint import ensure_staged

    out = Path(args.out)
    if (out / "hf").exists() and any((out / "hf").iterdir()):
        raise UserError(f"{out / 'hf'} exists and is not empty; choose another --out")
    source = _source(args)
    prompts = _read_prompts(args.prompts)
    lora = parse_lora(args.lora) if args.lora else []
    if args.adapter_only and not lora:
        raise UserError("--adapter-only writes LoRA adapters: add --lora r=16,... (or leave --adapter-only out)")
    settings = [f"model.seq_len={args.seq_len}", *lora, *args.set]
    swarm_args = argparse.Namespace(
        preset="debug", stages=args.stages, replicas=args.replicas, data_nodes=args.data_nodes, steps=args.steps,
        seed=args.seed, crash_at=args.crash_at, crash_stage=args.crash_stage, crash_phase=args.crash_phase,
        router=args.router, set=settings, out=str(out / "swarm"), timeout=args.timeout, device=args.device,
    )  # fmt: skip
    local_swarm.check_args(swarm_args, pretrained=True)  # before the checkpoint is converted or anything starts
    staged = ensure_staged(source, args.stages, out / "staged").resolve()
    cfg = run_config(staged, args.data, [*FINETUNE_DEFAULTS, *settings, f"train.seed={args.seed}"])
    before = validation_loss(cfg, _staged_stages(staged))
    print(f"validation loss of {Path(source).name} before fine-tuning: {before:.4f}")
    samples_before = complete(_staged_stages(staged), cfg, prompts)

    extras = local_swarm.SwarmExtras(
        bootstrap=["--from-pretrained", str(staged), "--data", args.data],
        data=["--linger"],
        after_done=lambda peers, run_id: export_final(peers, run_id, out, args.adapter_only),
        run_prefix="finetune",
    )
    code = local_swarm.run(swarm_args, extras)
    summary = json.loads((out / "swarm" / "summary.json").read_text())
    if code != 0 or "exported" not in summary:
        raise UserError(f"the fine-tuning swarm did not finish; see {out / 'swarm'}")
    final = _staged_stages(out / "final-staged")
    after = validation_loss(cfg, final)
    samples = [{"prompt": p, "before": b, "after": a}
               for p, b, a in zip(prompts, samples_before, complete(final, cfg, prompts), strict=True)]  # fmt: skip
    kept = ("exported", "weights_hash", "losses", "microbatches", "crash", "replicas")
    result = {"val_loss_before": before, "val_loss_after": after, **{k: summary[k] for k in kept},
              "source": str(source), "lora": cfg.lora.r > 0, "samples": samples}  # fmt: skip
    (out / "finetune.json").write_text(json.dumps(result, indent=1))
    for sample in samples:
        print(f"prompt {sample['prompt']!r}\n  before: {sample['before']!r}\n  after:  {sample['after']!r}")
    print(f"validation loss {before:.4f} -> {after:.4f}; model in {summary['exported']}")
    return 0


def _source(args: argparse.Namespace) -> str:
    """The checkpoint to start from: --from-pretrained, or a previous run's last export (--resume)."""
    if args.resume is None:
        if args.from_pretrained is None:
            raise UserError("give --from-pretrained PATH (a checkpoint), or --resume DIR (a previous --out)")
        return str(args.from_pretrained)
    if args.from_pretrained is not None:
        raise UserError("--resume continues a previous run's model: leave --from-pretrained out")
    from gwtf.models.checkpoint import is_staged

    for candidate in (Path(args.resume) / "final-staged", Path(args.resume) / "staged"):
        if is_staged(candidate):
            log.info("resuming from %s", candidate)
            return str(candidate)
    raise UserError(f"{args.resume} holds no final-staged/ or staged/ checkpoint; give the --out of a finetune run")


def _read_prompts(path: str | None) -> list[str]:
    if path is None:
        return []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --prompts {path}: {exc}") from exc
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {path} is empty; put one prompt a line in it")
    return prompts


def complete(stages, cfg: RunConfig, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy completions of `prompts` by the model the stages make (in transformers, as `gwtf generate` does)."""
    if not prompts:
        return []
    from transformers import AutoTokenizer

    from gwtf.launch.generate import generate_text
    from gwtf.models.checkpoint import read_manifest
    from gwtf.models.staged import stages_to_hf

    model = stages_to_hf(stages, cfg.model_config())
    for name, value in read_manifest(str(cfg.pretrained)).get("special_tokens", {}).items():
        if value is not None:
            setattr(model.generation_config, name, value)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.pretrained))
    return [generate_text(model, tokenizer, p, max_new_tokens=max_new_tokens) for p in prompts]


def export_final(peers: list[str], run_id: str, out: Path, adapter_only: bool = False) -> dict:
    """The swarm's final model, fetched once from its live nodes: OUT/final-staged (what --resume starts from) and
    OUT/hf (Hugging Face); a LoRA run's adapters merged into both, and its peft adapter in OUT/adapter."""
    import asyncio

    from gwtf.launch.export_run import export_stages, fetch_run, plain_stages, tokenizer_of
    from gwtf.models.checkpoint import save_staged, weights_hash

    cfg, model, stages, version, _ = asyncio.run(fetch_run(peers, run_id))
    tokenizer, special = tokenizer_of(cfg)
    plain = plain_stages(stages, cfg)
    save_staged(plain, model, out / "final-staged", tokenizer=tokenizer, source={"special_tokens": special})
    exported = out / "adapter" if adapter_only else out / "hf"
    export_stages(stages, cfg, exported)
    if cfg.lora.enabled and not adapter_only:
        export_stages(stages, cfg, out / "adapter", adapter_only=True)
    return {"exported": str(exported), "version": version, "weights_hash": weights_hash(plain)}


def run_config(staged: Path, data: str, overrides: list[str]) -> RunConfig:
    cfg = load_config(None, overrides)
    cfg.pretrained, cfg.data.tokenizer = str(staged), str(staged)
    cfg.data.corpus = str(Path(data).resolve())
    return cfg


def validation_loss(cfg: RunConfig, stages) -> float:
    """Mean loss over the corpus's held-out validation rows (the first val_batches microbatches), through the
    composed stages, on the trained tokens only where the data has a loss mask (completions, assistant turns)."""
    import torch

    from gwtf.data import load_data
    from gwtf.models.staged import loss_stages

    data = load_data(cfg.data, cfg.model_config().seq_len)
    if len(data.val) == 0:
        raise UserError(f"{cfg.data.corpus} is too small to hold out validation rows; give more text")
    labels = data.val if data.val_labels is None else data.val_labels
    size, n = cfg.train.microbatch_size, cfg.train.val_batches
    batches = list(zip(data.val.split(size), labels.split(size), strict=True))[:n]
    with torch.no_grad():
        losses = [loss_stages(stages, x, y).item() for x, y in batches]
    return sum(losses) / len(losses)


def _staged_stages(staged: Path):
    from gwtf.models.checkpoint import load_staged

    return load_staged(staged)[1]
