"""Model configuration and presets.

`ModelConfig` describes one model split into a pipeline: stage 0 (embedding, final norm, LM head) plus `n_stages`
relay stages of decoder layers. It converts to and from a transformers config and hashes canonically, so every node
of a run can check that it builds the same model.

    cfg = get_preset("debug")                 # tiny llama, 4 relay stages x 1 layer
    cfg = get_preset("124m", stages=6)        # keeps 3 layers per stage: 18 layers
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gwtf.errors import UserError

FAMILIES = ("llama", "gpt")
BYTE_VOCAB = 256 + 3  # byte tokenizer: 256 bytes + bos, eos, pad
ATTN_IMPLEMENTATION = "sdpa"  # one attention kernel everywhere, so staged and unsplit models compute the same ops
_ATTN_KWARGS: dict[str, Any] = {"attn_implementation": ATTN_IMPLEMENTATION}  # not in the configs' typed signatures


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" | "gpt"
    vocab_size: int
    d_model: int
    n_heads: int
    n_kv_heads: int  # llama grouped-query attention; gpt must equal n_heads
    n_layers: int  # total decoder layers
    n_stages: int  # relay stages S; stage 0 (embedding/head) is extra
    d_ff: int
    seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        problems = _validation_problems(self)
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def layer_ranges(self) -> list[range]:
        """Global layer indices of relay stages 1..S; earlier stages take the extra layers of an uneven split."""
        base, extra = divmod(self.n_layers, self.n_stages)
        ranges, start = [], 0
        for k in range(self.n_stages):
            size = base + (1 if k < extra else 0)
            ranges.append(range(start, start + size))
            start += size
        return ranges

    def equal_stages(self) -> bool:
        return self.n_layers % self.n_stages == 0

    def to_hf_config(self) -> Any:
        """The transformers config of the unsplit model (LlamaConfig or GPT2Config)."""
        if self.family == "llama":
            return _llama_hf_config(self)
        return _gpt_hf_config(self)

    @classmethod
    def from_hf_config(cls, hf_config: Any, n_stages: int) -> ModelConfig:
        """Read a transformers LlamaConfig/GPT2Config; UserError for architectures gwtf cannot reproduce exactly."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type == "llama":
            return _from_llama(cls, hf_config, n_stages)
        if model_type == "gpt2":
            return _from_gpt2(cls, hf_config, n_stages)
        raise UserError(
            f"unsupported architecture {model_type!r}; gwtf can split llama and gpt2 models "
            "(LlamaForCausalLM, GPT2LMHeadModel): convert a checkpoint of one of those"
        )

    def config_hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown model config fields {unknown}; expected some of {sorted(names)}")
        try:
            return cls(**d)
        except TypeError as exc:  # a required field is missing
            raise UserError(f"incomplete model config: {exc}") from exc

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _validation_problems(c: ModelConfig) -> list[str]:
    checks = [
        (c.family in FAMILIES, f"family {c.family!r} must be one of {FAMILIES}"),
        (c.vocab_size > 0 and c.d_model > 0 and c.d_ff > 0 and c.seq_len > 0, "sizes must be positive"),
        (c.n_heads > 0 and c.d_model % c.n_heads == 0, f"d_model {c.d_model} must divide into {c.n_heads} heads"),
        (c.n_kv_heads > 0 and c.n_heads % c.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"),
        (c.family != "gpt" or c.n_kv_heads == c.n_heads, "gpt has no grouped-query attention: n_kv_heads = n_heads"),
        (c.family != "llama" or c.head_dim % 2 == 0, "llama rotary embeddings need an even head dim"),
        (c.n_stages >= 1, "n_stages must be >= 1"),
        (c.n_layers >= c.n_stages, f"n_layers {c.n_layers} < n_stages {c.n_stages}: every stage needs a layer"),
        (c.norm_eps > 0 and c.rope_theta > 0, "norm_eps and rope_theta must be positive"),
        (0.0 <= c.dropout < 1.0, "dropout must be in [0, 1)"),
    ]
    return [message for ok, message in checks if not ok]


def require_equal_stages(cfg: ModelConfig) -> None:
    """Refuse uneven splits where relay stages must be interchangeable (CheckFree averages neighbours)."""
    if cfg.equal_stages():
        return
    options = [s for s in range(1, cfg.n_layers + 1) if cfg.n_layers % s == 0]
    raise UserError(
        f"{cfg.n_layers} layers do not split into {cfg.n_stages} equal stages; "
        f"use a stage count that divides the layers ({', '.join(map(str, options))})"
    )


# --- transformers configs -------------------------------------------------------------------------------------


def _llama_hf_config(c: ModelConfig) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        max_position_embeddings=c.seq_len,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings,
        attention_dropout=c.dropout,
        hidden_act="silu",
        initializer_range=0.02,
        **_ATTN_KWARGS,
    )


_GPT2_EOT = 50256


def _gpt_hf_config(c: ModelConfig) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=c.vocab_size,
        n_embd=c.d_model,
        n_head=c.n_heads,
        n_layer=c.n_layers,
        n_inner=c.d_ff,
        n_positions=c.seq_len,
        layer_norm_epsilon=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings,
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        activation_function="gelu_new",
        # GPT-2's <|endoftext|> id only exists in its own vocabulary
        bos_token_id=_GPT2_EOT if c.vocab_size > _GPT2_EOT else None,
        eos_token_id=_GPT2_EOT if c.vocab_size > _GPT2_EOT else None,
        initializer_range=0.02,
        **_ATTN_KWARGS,
    )


def _unsupported(hf_config: Any, what: str) -> UserError:
    return UserError(f"unsupported {hf_config.model_type} variant: {what}; gwtf splits only the standard architecture")


def _from_llama(cls: type[ModelConfig], h: Any, n_stages: int) -> ModelConfig:
    rope = dict(getattr(h, "rope_parameters", None) or {})
    head_dim = getattr(h, "head_dim", None) or h.hidden_size // h.num_attention_heads
    if rope.get("rope_type", "default") != "default":
        raise _unsupported(h, f"rope_type {rope.get('rope_type')!r}")
    if h.hidden_act != "silu" or h.attention_bias or h.mlp_bias:
        raise _unsupported(h, f"hidden_act={h.hidden_act}, attention_bias={h.attention_bias}, mlp_bias={h.mlp_bias}")
    if head_dim * h.num_attention_heads != h.hidden_size:
        raise _unsupported(h, f"head_dim {head_dim} x {h.num_attention_heads} heads != hidden_size {h.hidden_size}")
    return cls(
        family="llama",
        vocab_size=h.vocab_size,
        d_model=h.hidden_size,
        n_heads=h.num_attention_heads,
        n_kv_heads=h.num_key_value_heads or h.num_attention_heads,
        n_layers=h.num_hidden_layers,
        n_stages=n_stages,
        d_ff=h.intermediate_size,
        seq_len=h.max_position_embeddings,
        norm_eps=float(h.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        tie_embeddings=bool(h.tie_word_embeddings),
        dropout=float(h.attention_dropout or 0.0),
    )


def _from_gpt2(cls: type[ModelConfig], h: Any, n_stages: int) -> ModelConfig:
    if h.activation_function != "gelu_new" or not h.scale_attn_weights or h.add_cross_attention:
        raise _unsupported(h, f"activation {h.activation_function}, scale_attn_weights={h.scale_attn_weights}")
    if h.scale_attn_by_inverse_layer_idx:  # per-layer scaling would make relay stages differ by position
        raise _unsupported(h, "scale_attn_by_inverse_layer_idx=True")
    pdrops = {h.resid_pdrop, h.embd_pdrop, h.attn_pdrop}
    return cls(
        family="gpt",
        vocab_size=h.vocab_size,
        d_model=h.n_embd,
        n_heads=h.n_head,
        n_kv_heads=h.n_head,
        n_layers=h.n_layer,
        n_stages=n_stages,
        d_ff=h.n_inner or 4 * h.n_embd,
        seq_len=h.n_positions,
        norm_eps=float(h.layer_norm_epsilon),
        tie_embeddings=bool(h.tie_word_embeddings),
        dropout=float(max(pdrops)),  # one dropout rate in gwtf; the largest of the source's rates
    )


# --- presets ---------------------------------------------------------------------------------------------------


def debug() -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=BYTE_VOCAB,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        n_layers=4,
        n_stages=4,
        d_ff=172,
        seq_len=64,
    )


def debug_gpt() -> ModelConfig:
    return debug().replace(family="gpt", n_kv_heads=4, tie_embeddings=True)  # GPT-2 ties its embeddings


def llama_124m() -> ModelConfig:
    """123.5M parameters, as its name says (GPT-2 small's width and depth): LLaMA's usual 8/3 d rounded to 256 would
    give d_ff 2048 and 134M; 1664 (a multiple of 128) keeps the name true."""
    return ModelConfig(
        family="llama",
        vocab_size=32000,
        d_model=768,
        n_heads=12,
        n_kv_heads=12,
        n_layers=12,
        n_stages=4,
        d_ff=1664,
        seq_len=512,
    )


def llama_500m() -> ModelConfig:
    """498.8M parameters: GPT-2 large's width (1280, 20 heads of 64) at GPT-2 medium's depth (24 layers); d_ff 2816
    (2.2 d, a multiple of 256) keeps the name true, as for `124m` (8/3 d would give 3584 and 569M). The width and depth
    it had before (1024 x 24) held 374M."""
    return ModelConfig(
        family="llama",
        vocab_size=32000,
        d_model=1280,
        n_heads=20,
        n_kv_heads=20,
        n_layers=24,
        n_stages=6,
        d_ff=2816,
        seq_len=1024,
    )


def llama_1_5b() -> ModelConfig:
    """1.515B parameters: LLaMA's 8/3 d (5632) would give 1.36B; d_ff 6656 (3.25 d, a multiple of 256) keeps the name
    true with the width, depth and sequence length unchanged, so a microbatch of 8 x 4096 still moves 256 MiB between
    stages (gwtf.sizing)."""
    return ModelConfig(
        family="llama",
        vocab_size=32000,
        d_model=2048,
        n_heads=16,
        n_kv_heads=16,
        n_layers=24,
        n_stages=6,
        d_ff=6656,
        seq_len=4096,
    )


def gpt_355m() -> ModelConfig:
    """GPT-2 medium: 354.8M parameters (called `gpt-500m` before, which it never held)."""
    return ModelConfig(
        family="gpt",
        vocab_size=50257,
        d_model=1024,
        n_heads=16,
        n_kv_heads=16,
        n_layers=24,
        n_stages=6,
        d_ff=4 * 1024,
        seq_len=1024,
        tie_embeddings=True,
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "debug": debug,
    "debug-gpt": debug_gpt,
    "124m": llama_124m,
    "500m": llama_500m,
    "1.5b": llama_1_5b,
    "gpt-355m": gpt_355m,
}
RENAMED = {"gpt-500m": "gpt-355m"}  # old name -> new: named after what they hold


def get_preset(name: str, stages: int | None = None, **overrides: Any) -> ModelConfig:
    """A preset by name; `stages=S` keeps its layers per stage (n_layers = S x layers per stage)."""
    if name in RENAMED:
        raise UserError(f"model preset {name!r} is now {RENAMED[name]!r} (named after the parameters it holds)")
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    if stages is not None:
        if stages < 1:
            raise UserError(f"stages must be >= 1, got {stages}")
        per_stage = cfg.n_layers // cfg.n_stages
        cfg = cfg.replace(n_stages=stages, n_layers=stages * per_stage)
    return cfg.replace(**overrides) if overrides else cfg
