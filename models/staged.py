"""A decoder-only language model cut into pipeline stages, on transformers' own layers.

Stage 0 (`HeadStage`) lives on data nodes: token embedding (+ learned positions for gpt), final norm, LM head, loss.
Stages 1..S (`BlockStage`) are runs of decoder layers. A relay stage needs only its input hidden states: it
recomputes the rotary embeddings and the causal mask itself, so any replica can run any microbatch.

Parameter names are local to a stage ("blocks.0.self_attn.q_proj.weight", ...), so equal relay stages share state
dict keys and shapes: replicas, neighbours (CheckFree) and exporters exchange them by name.

    stages = build_stages(get_preset("debug"), seed=0)
    hidden = stages[0].embed(input_ids)                   # (batch, seq, d_model)
    for stage in stages[1:]:
        hidden = stage(hidden)                            # (batch, seq, d_model)
    loss = stages[0].loss(hidden, input_ids)
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt2.modeling_gpt2 import GPT2Block, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.pytorch_utils import Conv1D

from gwtf.models.presets import ModelConfig

INIT_STD = 0.02
IGNORE_INDEX = -100
LOSS_CHUNK_BYTES = 64 << 20  # fp32 logits computed at once by HeadStage.loss (a 32000 vocabulary: 524 positions)


# --- stage 0 ---------------------------------------------------------------------------------------------------


class HeadStage(nn.Module):
    """Embedding, final norm and LM head; with tied embeddings the head reuses `tok_embed.weight`."""

    stage_index = 0

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # gpt learns absolute positions; llama's rotary positions live in the relay stages
        self.pos_embed = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.family == "gpt" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = _final_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def embed(self, input_ids: Tensor) -> Tensor:
        # (batch, seq) -> (batch, seq, d_model)
        hidden = self.tok_embed(input_ids)
        if self.pos_embed is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            hidden = hidden + self.pos_embed(positions)[None]
        return self.drop(hidden)

    def logits(self, hidden: Tensor) -> Tensor:
        # (batch, seq, d_model) -> (batch, seq, vocab)
        head_weight = self.tok_embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm(hidden), head_weight)

    def loss(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """Mean next-token cross-entropy: position t predicts labels[t + 1]; labels of -100 are ignored.

        Computed in chunks of positions, each chunk's logits recomputed in the backward (activation checkpointing),
        so the full (batch, seq, vocab) logits never exist at once: 4.2 GB in fp32 for a 1.5b microbatch of 8 x 4096
        at a 32000 vocabulary. A microbatch within one chunk (the debug model's) is computed in one piece."""
        normed = self.norm(hidden)[:, :-1]  # the norm is per position: the last one predicts nothing
        flat = normed.reshape(-1, normed.shape[-1])  # (batch * (seq - 1), d_model)
        targets = labels[:, 1:].reshape(-1).to(flat.device)
        head_weight = self.tok_embed.weight if self.lm_head is None else self.lm_head.weight
        valid = int((targets != IGNORE_INDEX).sum())
        chunk = max(1, LOSS_CHUNK_BYTES // (4 * self.cfg.vocab_size))  # positions whose fp32 logits fit a chunk
        if flat.shape[0] <= chunk:
            total = _ce_sum(flat, head_weight, targets)
        else:
            total = flat.new_zeros((), dtype=torch.float32)
            for i in range(0, flat.shape[0], chunk):
                part = checkpoint(
                    _ce_sum, flat[i : i + chunk], head_weight, targets[i : i + chunk], use_reentrant=False
                )
                total = total + part
        if valid == 0:  # a row of prompt only (a loss mask): no target, zero loss (still a graph to backward)
            return total * 0.0
        return total / valid


def _ce_sum(hidden: Tensor, head_weight: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of (positions, d_model) normed hidden states against their targets."""
    logits = F.linear(hidden, head_weight)
    if logits.dtype in (torch.float16, torch.bfloat16):  # as transformers: the softmax runs in fp32
        logits = logits.float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _final_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "llama":
        return LlamaRMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


# --- relay stages ----------------------------------------------------------------------------------------------


class _LlamaLayerInputs(nn.Module):
    """What every Llama layer needs besides the hidden states: rotary cos/sin, positions and the causal mask."""

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.rotary = LlamaRotaryEmbedding(hf_config)  # non-persistent buffers only: not in the state dict

    def forward(self, hidden: Tensor) -> dict[str, Any]:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
        return {
            "attention_mask": _causal_mask(self.hf_config, hidden, position_ids),
            "position_ids": position_ids,
            "position_embeddings": self.rotary(hidden, position_ids),
        }


class _GPTLayerInputs(nn.Module):
    """GPT-2 layers need only the causal mask (positions were added to the embeddings in stage 0)."""

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        self.hf_config = hf_config

    def forward(self, hidden: Tensor) -> dict[str, Any]:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
        return {"attention_mask": _causal_mask(self.hf_config, hidden, position_ids)}


def _causal_mask(hf_config: Any, hidden: Tensor, position_ids: Tensor) -> Any:
    # None under sdpa without padding: the kernel applies causality itself, exactly as in the unsplit model
    return create_causal_mask(
        config=hf_config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=position_ids
    )


class BlockStage(nn.Module):
    """Relay stage k: decoder layers `layer_range` of the full model, under local names blocks.0, blocks.1, ..."""

    def __init__(self, cfg: ModelConfig, stage_index: int) -> None:
        super().__init__()
        if not 1 <= stage_index <= cfg.n_stages:
            raise ValueError(f"relay stage index {stage_index} outside 1..{cfg.n_stages}")
        self.cfg = cfg
        self.stage_index = stage_index
        self.layer_range = cfg.layer_ranges()[stage_index - 1]
        hf_config = cfg.to_hf_config()
        layers: list[nn.Module]
        if cfg.family == "llama":
            self.layer_inputs: nn.Module = _LlamaLayerInputs(hf_config)
            layers = [LlamaDecoderLayer(hf_config, layer_idx=i) for i in self.layer_range]
        else:
            self.layer_inputs = _GPTLayerInputs(hf_config)
            layers = [GPT2Block(hf_config, layer_idx=i) for i in self.layer_range]
        self.blocks = nn.ModuleList(layers)

    def forward(self, hidden: Tensor) -> Tensor:
        # (batch, seq, d_model) -> (batch, seq, d_model)
        layer_kwargs = self.layer_inputs(hidden)
        for block in self.blocks:
            hidden = block(hidden, **layer_kwargs)
        return hidden


# --- building --------------------------------------------------------------------------------------------------


def build_stage(cfg: ModelConfig, k: int, seed: int) -> nn.Module:
    """Stage k with weights drawn from (seed, k) alone: a node can build its stage without the others."""
    with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG; leave it untouched
        stage: nn.Module = HeadStage(cfg) if k == 0 else BlockStage(cfg, k)
    _init_weights(stage, _stage_generator(seed, k))
    return stage


def build_stages(cfg: ModelConfig, seed: int) -> list[nn.Module]:
    return [build_stage(cfg, k, seed) for k in range(cfg.n_stages + 1)]


def _stage_generator(seed: int, k: int) -> torch.Generator:
    digest = hashlib.sha256(f"gwtf-stage:{seed}:{k}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


_NORMS = (LlamaRMSNorm, nn.LayerNorm)
_MATRICES = (nn.Linear, Conv1D, nn.Embedding)


@torch.no_grad()
def _init_weights(stage: nn.Module, generator: torch.Generator) -> None:
    """transformers' scheme: matrices and embeddings N(0, 0.02), biases 0, norm scales 1."""
    for module in stage.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, _NORMS):
                param.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                param.zero_()
            elif isinstance(module, _MATRICES):
                param.normal_(0.0, INIT_STD, generator=generator)
            else:
                raise TypeError(f"no init rule for {type(module).__name__}.{name}")


# --- transformers <-> stages -------------------------------------------------------------------------------------

# (layer prefix, {HF name of a stage-0 parameter: local name}) per family
_HF_LAYOUT: dict[str, tuple[str, dict[str, str]]] = {
    "llama": (
        "model.layers.",
        {"model.embed_tokens.weight": "tok_embed.weight", "model.norm.weight": "norm.weight"},
    ),
    "gpt": (
        "transformer.h.",
        {
            "transformer.wte.weight": "tok_embed.weight",
            "transformer.wpe.weight": "pos_embed.weight",
            "transformer.ln_f.weight": "norm.weight",
            "transformer.ln_f.bias": "norm.bias",
        },
    ),
}
_HF_MODEL_CLASS = {"llama": LlamaForCausalLM, "gpt": GPT2LMHeadModel}


def hf_name_map(cfg: ModelConfig) -> dict[str, tuple[int, str]]:
    """HF parameter name -> (stage index, local name) for every parameter of the unsplit model."""
    layer_prefix, head_names = _HF_LAYOUT[cfg.family]
    mapping = {hf: (0, local) for hf, local in head_names.items()}
    if not cfg.tie_embeddings:
        mapping["lm_head.weight"] = (0, "lm_head.weight")
    for k, layers in enumerate(cfg.layer_ranges(), start=1):
        block_names = _block_param_names(cfg)
        for local_i, global_i in enumerate(layers):
            for name in block_names:
                mapping[f"{layer_prefix}{global_i}.{name}"] = (k, f"blocks.{local_i}.{name}")
    return mapping


def _block_param_names(cfg: ModelConfig) -> list[str]:
    one_layer = cfg.replace(n_layers=1, n_stages=1)
    with torch.device("meta"):  # shapes only, no memory and no RNG
        block = BlockStage(one_layer, 1).blocks[0]
    return [name for name, _ in block.named_parameters()]


def stages_from_hf(hf_model: nn.Module, cfg: ModelConfig) -> list[nn.Module]:
    """Split a LlamaForCausalLM / GPT2LMHeadModel into [stage 0, stage 1..S] (weights are copied)."""
    hf_state = hf_model.state_dict()
    mapping = hf_name_map(cfg)
    missing = sorted(set(mapping) - set(hf_state))
    if missing:
        raise ValueError(f"model does not match the config: it lacks {missing[:5]}")
    per_stage: list[dict[str, Tensor]] = [{} for _ in range(cfg.n_stages + 1)]
    for hf_name, (k, local) in mapping.items():
        per_stage[k][local] = hf_state[hf_name]
    stages = [empty_stage(cfg, k) for k in range(cfg.n_stages + 1)]
    for stage, state in zip(stages, per_stage):
        stage.load_state_dict(state, strict=True)
    return stages


def empty_stage(cfg: ModelConfig, k: int) -> nn.Module:
    """Stage k with untouched constructor weights, to be overwritten by a load (cheaper than build_stage)."""
    with torch.random.fork_rng(devices=[]):  # its weights are overwritten next; the global RNG stays as it was
        return HeadStage(cfg) if k == 0 else BlockStage(cfg, k)


def stages_to_hf(stages: list[nn.Module], cfg: ModelConfig) -> Any:
    """Assemble the stages into one transformers model (LlamaForCausalLM / GPT2LMHeadModel) with their weights."""
    if len(stages) != cfg.n_stages + 1:
        raise ValueError(f"expected {cfg.n_stages + 1} stages, got {len(stages)}")
    stage_states = [stage.state_dict() for stage in stages]
    hf_state = {hf: stage_states[k][local] for hf, (k, local) in hf_name_map(cfg).items()}
    with torch.random.fork_rng(devices=[]):
        model = _HF_MODEL_CLASS[cfg.family](cfg.to_hf_config())
    model.to(next(iter(hf_state.values())).dtype)
    result = model.load_state_dict(hf_state, strict=False)
    unexpected_missing = [name for name in result.missing_keys if name != "lm_head.weight"]
    if unexpected_missing or result.unexpected_keys:
        raise ValueError(f"stage weights do not fit the model: {unexpected_missing[:5]} {result.unexpected_keys[:5]}")
    if cfg.tie_embeddings:
        model.tie_weights()
    return model.eval()


# --- composed pipeline (tests, evaluation) ---------------------------------------------------------------------


def _head(stages: list[nn.Module]) -> HeadStage:
    head = stages[0]
    if not isinstance(head, HeadStage):
        raise TypeError(f"stage 0 must be a HeadStage, got {type(head).__name__}")
    return head


def _last_hidden(stages: list[nn.Module], input_ids: Tensor) -> Tensor:
    hidden = _head(stages).embed(input_ids)
    for stage in stages[1:]:
        hidden = stage(hidden)
    return hidden


def forward_stages(stages: list[nn.Module], input_ids: Tensor) -> Tensor:
    """Logits of the whole pipeline run in one process: (batch, seq) -> (batch, seq, vocab)."""
    return _head(stages).logits(_last_hidden(stages, input_ids))


def loss_stages(stages: list[nn.Module], input_ids: Tensor, labels: Tensor | None = None) -> Tensor:
    """Next-token loss of the whole pipeline with labels = input_ids (or `labels`: -100 where not trained on)."""
    return _head(stages).loss(_last_hidden(stages, input_ids), input_ids if labels is None else labels)
