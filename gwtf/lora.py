"""LoRA adapters across the swarm: `[lora]` in a run config (`--lora r=16,alpha=32,targets=q_proj,v_proj`).

With `lora.r > 0` every stage is built as before (the pretrained base from the staged copy, or downloaded from a
donor once) and then peft's LoRA is injected into its transformers modules (`peft.inject_adapter_in_model`, the
function peft itself uses under `get_peft_model`): the base is frozen, and only the adapters' parameters have
`requires_grad`. Everything that moves state works on the trainable parameters only (gwtf.stage): gradients
averaged, optimizer state, a joiner's download, CheckFree's rebuild (the adapters of a lost stage from its
neighbours' adapters; its frozen base is its own, from the staged copy). Stage 0 (embedding, head) stays frozen.

The adapters' initial weights are drawn from (seed, stage), so every first replica of a stage starts identical.
Export merges the adapters into the base weights (`merged_stage`: peft's own `merge`) or writes a peft adapter
directory that `peft.PeftModel.from_pretrained(base, DIR)` loads (`save_adapter`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gwtf.errors import UserError

ADAPTER = "default"  # peft's adapter name


@dataclass
class LoraConfig:
    """`[lora]`: adapters instead of full fine-tuning when r > 0 (the default, 0, trains every weight)."""

    r: int = 0  # rank of the adapters; 0: full fine-tuning
    alpha: int = 16  # scaling: the adapter's update is (alpha / r) * B A
    targets: str = "q_proj,v_proj"  # comma-separated module names (llama: q_proj k_proj v_proj o_proj gate_proj ..)
    dropout: float = 0.0  # LoRA dropout: 0 keeps a recomputed forward identical to the first

    def __post_init__(self) -> None:
        if self.r < 0:
            raise UserError(f"lora.r={self.r} must be >= 0 (0: full fine-tuning)")
        if not self.alpha > 0:
            raise UserError(f"lora.alpha={self.alpha} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if self.r and not self.target_list():
            raise UserError("lora.targets is empty; name the modules to adapt, e.g. q_proj,v_proj")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def peft_config(self) -> Any:
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=self.target_list(),
                              lora_dropout=self.dropout, bias="none")  # fmt: skip


def parse_lora(spec: str) -> list[str]:
    """`r=16,alpha=32,targets=q_proj,v_proj` as `--set` overrides (a bare item continues the previous value's list:
    targets=q_proj,v_proj). UserError on an unknown key."""
    items: list[list[str]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if sep:
            if key.strip() not in {"r", "alpha", "targets", "dropout"}:
                raise UserError(f"--lora {spec!r}: unknown key {key.strip()!r}; use r, alpha, targets, dropout")
            items.append([key.strip(), value.strip()])
        elif items and items[-1][0] == "targets":
            items[-1][1] += f",{part}"
        else:
            raise UserError(f"--lora {spec!r}: {part!r} is not key=value (e.g. r=16,alpha=32,targets=q_proj,v_proj)")
    if not any(k == "r" for k, _ in items):
        raise UserError(f"--lora {spec!r} needs r=RANK (e.g. r=16)")
    return [f"lora.{k}={_quoted(k, v)}" for k, v in items]


def _quoted(key: str, value: str) -> str:
    return f'"{value}"' if key == "targets" else value


def apply_lora(module: nn.Module, cfg: LoraConfig, stage: int, seed: int) -> nn.Module:
    """Freeze `module` and, on a relay stage, inject the adapters (in place), drawn from (seed, stage)."""
    if not cfg.enabled:
        return module
    if stage == 0:  # embedding, norm and head: frozen, no adapter (peft's default, no modules_to_save)
        module.requires_grad_(False)
        return module
    from peft import inject_adapter_in_model

    digest = hashlib.sha256(f"gwtf-lora:{seed}:{stage}".encode()).digest()
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global RNG: seeded, and left untouched
        torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        try:
            inject_adapter_in_model(cfg.peft_config(), module, adapter_name=ADAPTER)
        except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
            raise UserError(f"lora.targets={cfg.targets!r}: {str(exc).splitlines()[0]}") from exc
    return module


def is_lora(module: nn.Module) -> bool:
    return any(".lora_" in n for n, _ in module.named_parameters())


def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def keep_own_frozen(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """A rebuilt stage's state with the frozen entries replaced by `module`'s own: under LoRA a lost stage's base is
    known exactly (its staged copy), only its adapters were lost and are rebuilt."""
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    own = module.state_dict()
    return {n: own[n].detach().clone() if n in frozen else t for n, t in state.items()}


@torch.no_grad()
def merged_stage(module: nn.Module, cfg: Any, k: int) -> nn.Module:
    """A plain stage (models.staged names) whose weights are `module`'s base with its adapters merged in, by peft's
    own `merge` on a copy (W + (alpha / r) * B A)."""
    import copy

    from peft.tuners.lora import LoraLayer

    from gwtf.models.staged import empty_stage

    work = copy.deepcopy(module)
    for layer in work.modules():
        if isinstance(layer, LoraLayer):
            layer.merge(adapter_names=[ADAPTER])
    state = {n.replace(".base_layer.", "."): t for n, t in work.state_dict().items() if ".lora_" not in n}
    plain = empty_stage(cfg, k)
    plain.load_state_dict(state, strict=True)
    return plain


def base_stage(module: nn.Module, cfg: Any, k: int) -> nn.Module:
    """The frozen base of a LoRA stage as a plain stage (adapters left out)."""
    from gwtf.models.staged import empty_stage

    state = {n.replace(".base_layer.", "."): t for n, t in module.state_dict().items() if ".lora_" not in n}
    plain = empty_stage(cfg, k)
    plain.load_state_dict(state, strict=True)
    return plain


def save_adapter(stages: list[nn.Module], model_cfg: Any, lora: LoraConfig, out_dir: str | Path,
                 tokenizer: Any = None) -> Path:  # fmt: skip
    """A peft adapter directory (adapter_config.json, adapter_model.safetensors) for the unsplit Hugging Face model:
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)`."""
    from peft import get_peft_model

    from gwtf.models.staged import hf_name_map, stages_to_hf

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new directory or remove it first")
    base = stages_to_hf([base_stage(s, model_cfg, k) if k else s for k, s in enumerate(stages)], model_cfg)
    peft_model = get_peft_model(base, lora.peft_config())
    local_to_hf = {(k, local): hf for hf, (k, local) in hf_name_map(model_cfg).items()}
    params = dict(peft_model.named_parameters())
    copied = 0
    with torch.no_grad():
        for k, stage in enumerate(stages[1:], start=1):
            for name, t in stage.named_parameters():
                if ".lora_" not in name:
                    continue
                owner, _, tail = name.partition(".lora_")  # blocks.0.self_attn.q_proj / A.default.weight
                hf_owner = local_to_hf[(k, f"{owner}.weight")].removesuffix(".weight")
                params[f"base_model.model.{hf_owner}.lora_{tail}"].copy_(t)
                copied += 1
    if copied != sum(1 for n in params if ".lora_" in n):
        raise UserError(f"the run's adapters ({copied} tensors) do not fit lora.targets={lora.targets!r}")
    peft_model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
