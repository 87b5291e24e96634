"""Memory per relay stage, measured: parameters, optimizer state, bytes kept per held microbatch (fp32 and bf16,
activation checkpointing off and on) and the capacity a relay derives from a given device memory.

    python -m gwtf.benchmarks.memory --presets debug 124m --device-memory-gib 24 --json OUT
    python -m gwtf.benchmarks.memory --presets 1.5b --microbatch-size 1 --device cuda    # minutes on a CPU

Nothing is computed from formulas: the optimizer state is what AdamW allocates at its first step, the kept bytes are
what autograd saves in probe forwards through the replica's own forward (gwtf.sizing.kept_bytes, the figure a relay
measures when it joins without --capacity), on `--device`. The capacity is gwtf.sizing.capacity_from for a device
of `--device-memory-gib` holding this one stage (its margin as on CUDA; uncapped by the run's microbatches per step).
Every relay stage of a preset has the same shape, so stage 1 stands for all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from gwtf.device import PRECISIONS, resolve_device
from gwtf.errors import UserError
from gwtf.models.presets import get_preset
from gwtf.models.staged import build_stage
from gwtf.optim import OptimConfig
from gwtf.sizing import GIB, MIB, capacity_from, kept_bytes, margin_bytes
from gwtf.stage import StageReplica

UNCAPPED = 1 << 30


def optimizer_bytes(replica: StageReplica) -> int:
    """Bytes of optimizer state AdamW allocates at its first step (zero gradients: the weights barely move)."""
    for p in replica.trainable():
        p.grad = torch.zeros_like(p)
    replica.optimizer.step()
    replica.module.zero_grad(set_to_none=True)
    return sum(t.numel() * t.element_size() for st in replica.optimizer.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)  # fmt: skip


def stage_memory(preset: str, device: torch.device, batch: int, seq_len: int | None, memory: int) -> dict[str, Any]:
    cfg = get_preset(preset)
    cfg = cfg.replace(seq_len=seq_len) if seq_len else cfg
    row: dict[str, Any] = {"preset": preset, "stage": 1, "layers": len(cfg.layer_ranges()[0]), "batch": batch,
                           "seq_len": cfg.seq_len, "device": str(device),
                           "device_memory_gib": memory / GIB}  # fmt: skip
    for precision in PRECISIONS:
        for checkpointing in (False, True):
            replica = StageReplica(1, build_stage(cfg, 1, 0).to(device), OptimConfig(), total_steps=1,
                                   precision=precision, checkpointing=checkpointing)  # fmt: skip
            if "params" not in row:
                row["params"] = sum(p.numel() for p in replica.module.parameters())
                row["param_bytes"] = sum(p.numel() * p.element_size() for p in replica.module.parameters())
                row["optimizer_bytes"] = optimizer_bytes(replica)
            kept = kept_bytes(replica, batch, cfg.seq_len, cfg.d_model)
            free = memory - row["param_bytes"]
            state = row["param_bytes"] + row["optimizer_bytes"]  # gradients (as large as the weights) and moments
            try:
                capacity: int | str = capacity_from(free, kept, state, margin_bytes(torch.device("cuda"), free, memory),
                                                    UNCAPPED)  # fmt: skip
            except UserError:
                capacity = "does not fit"
            key = f"{precision}{'_ckpt' if checkpointing else ''}"
            row[key] = {"kept_bytes_per_microbatch": kept, "capacity": capacity}
            del replica
    return row


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'preset':<8}{'layers':>7}{'params':>11}{'optim MiB':>11}  kept MiB per microbatch -> capacity "
          "(fp32 | fp32+ckpt | bf16 | bf16+ckpt)")  # fmt: skip
    for r in rows:
        cells = [f"{r[k]['kept_bytes_per_microbatch'] / MIB:.1f} -> {r[k]['capacity']}"
                 for k in ("fp32", "fp32_ckpt", "bf16", "bf16_ckpt")]  # fmt: skip
        print(f"{r['preset']:<8}{r['layers']:>7}{r['params'] / 1e6:>10.1f}M{r['optimizer_bytes'] / MIB:>11.0f}  "
              f"{' | '.join(cells)}   ({r['batch']} x {r['seq_len']}, {r['device_memory_gib']:.0f} GiB)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["debug", "124m"], help="presets (default: debug 124m)")
    parser.add_argument("--device", default="cpu", help="where the probes run: cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument("--microbatch-size", type=int, default=8, help="rows per microbatch (default: 8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the preset's)")
    parser.add_argument("--device-memory-gib", type=float, default=24.0, help="the device (default: 24 GiB)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    memory = int(args.device_memory_gib * GIB)
    rows = [stage_memory(p, device, args.microbatch_size, args.seq_len, memory) for p in args.presets]
    print_rows(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
