"""The run configuration: each component's own dataclass config, composed into one `RunConfig`.

A run config is read from a TOML file and then from `key=value` overrides, later ones winning:

    preset = "debug"          # a models.presets name
    stages = 4                # relay stages (optional; the preset's own count otherwise)
    [model]                   # overrides of the preset's ModelConfig fields
    d_model = 128
    [data]                    # gwtf.data.DataConfig
    corpus = "embedded"
    [optim]                   # gwtf.optim.OptimConfig
    lr = 3e-3
    [train]                   # TrainConfig below
    steps = 200
    [routing]                 # gwtf.routing.config.RoutingConfig
    router = "gwtf-p2p"
    [recovery]                # gwtf.recovery.config.RecoveryConfig
    strategy = "checkfree+"
    # and [transport], [membership], [iteration], [averaging], [wire]: each component's own settings (SECTIONS below)

    cfg = load_config("run.toml", ["train.steps=20", "optim.betas=[0.9, 0.99]", "model.d_model=96"])

Every setting of a run lives in the config of the component that owns it, composed here, and is carried by the run
record, so every node of a run agrees on it; a node's own values (capacity, region) come from its join flags
(gwtf.runtime.spec.NodeOptions).

Override values are read as TOML literals when they parse as one (numbers, booleans, lists, quoted strings) and as
plain strings otherwise, then coerced to the field's type. Unknown keys are a UserError that lists the valid ones.
`to_dict`/`from_dict` round-trip a RunConfig through plain JSON-able dicts (the run record in the DHT).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from gwtf.averaging import AveragingConfig
from gwtf.data import DataConfig
from gwtf.device import check_precision
from gwtf.errors import UserError
from gwtf.lora import LoraConfig
from gwtf.membership import MembershipConfig
from gwtf.models.checkpoint import read_manifest
from gwtf.models.presets import ModelConfig, get_preset
from gwtf.optim import OptimConfig
from gwtf.recovery.config import RecoveryConfig
from gwtf.routing.config import RoutingConfig
from gwtf.runtime.config import IterationConfig
from gwtf.transport.config import TransportConfig, WireConfig


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    microbatch_size: int = 8  # rows of seq_len tokens per microbatch
    microbatches_per_step: int = 4  # over all data nodes; a multiple of their number
    seed: int = 0  # model initialisation and the microbatch schedule
    eval_every: int = 50  # validation every this many steps (0: only at the end)
    val_batches: int = 8  # validation microbatches (the first ones of the validation rows)
    precision: str = "fp32"  # fp32 | bf16 (autocast, fp32 master weights; activations travel in bf16)
    activation_checkpointing: bool = False  # relays keep only each microbatch's input, recompute in the backward

    def __post_init__(self) -> None:
        check_precision(self.precision)
        positive = {"steps": self.steps, "microbatch_size": self.microbatch_size,
                    "microbatches_per_step": self.microbatches_per_step, "val_batches": self.val_batches}  # fmt: skip
        bad = [f"train.{k}={v}" for k, v in positive.items() if v < 1]
        if self.eval_every < 0:
            bad.append(f"train.eval_every={self.eval_every}")
        if bad:
            raise UserError(f"{', '.join(bad)}: these must be positive (eval_every may be 0)")


# section name -> the component's config class (each validates its own fields)
SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "transport": TransportConfig,
    "membership": MembershipConfig,
    "routing": RoutingConfig,
    "recovery": RecoveryConfig,
    "iteration": IterationConfig,
    "averaging": AveragingConfig,
    "wire": WireConfig,
    "lora": LoraConfig,
}


@dataclass
class RunConfig:
    preset: str = "debug"
    stages: int | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    iteration: IterationConfig = field(default_factory=IterationConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    wire: WireConfig = field(default_factory=WireConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters instead of full fine-tuning (gwtf.lora)
    pretrained: str | None = None  # a staged checkpoint directory (`gwtf convert`): fine-tuning starts from it
    resume: str | None = None  # a run's exported state (`gwtf export` writes DIR/state): the run goes on from its step

    def __post_init__(self) -> None:
        if self.stages is not None and self.stages < 1:
            raise UserError(f"stages={self.stages}: a run needs at least 1 relay stage (or leave it to the preset)")

    def model_config(self) -> ModelConfig:
        """The preset's model, or the pretrained checkpoint's (whose split into stages is fixed by its files)."""
        if self.pretrained:
            cfg = ModelConfig.from_dict(read_manifest(self.pretrained)["model"])
            if self.stages is not None and self.stages != cfg.n_stages:
                raise UserError(
                    f"{self.pretrained} is split into {cfg.n_stages} relay stages, not {self.stages}: convert it "
                    f"again with `gwtf convert --stages {self.stages}`"
                )
            return _pretrained_overrides(cfg, self.model_overrides)
        return get_preset(self.preset, self.stages, **self.model_overrides)


def _pretrained_overrides(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """A pretrained model's weights fix its shape; only a shorter training sequence can be chosen, and only where
    positions are rotary (llama): GPT's learned position table is part of its weights."""
    other = sorted(set(overrides) - {"seq_len"})
    if other:
        raise UserError(f"model.{other[0]} cannot be changed on a pretrained model (its weights fix it)")
    seq_len = overrides.get("seq_len")
    if seq_len is None or seq_len == cfg.seq_len:
        return cfg
    if cfg.family != "llama" or not 1 <= int(seq_len) <= cfg.seq_len:
        raise UserError(f"model.seq_len={seq_len}: a pretrained {cfg.family} model can train on 1..{cfg.seq_len}"
                        + (" (llama only)" if cfg.family != "llama" else ""))  # fmt: skip
    return cfg.replace(seq_len=int(seq_len))


# ---------------------------------------------------------------------------------------------------------------
# dicts


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain JSON-able dict (tuples become lists)."""
    d = dataclasses.asdict(cfg)
    d["optim"]["betas"] = list(d["optim"]["betas"])
    return d


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Inverse of to_dict; missing keys take their defaults, unknown keys are a UserError."""
    top = {"preset", "stages", "model_overrides", "pretrained", "resume", *SECTIONS}
    _check_keys(d, top, "run config")
    sections = {}
    for name, cls in SECTIONS.items():
        values = d.get(name, {})
        _check_keys(values, _field_names(cls), f"[{name}]")
        sections[name] = cls(**{k: _coerce(v, _field_types(cls)[k], f"{name}.{k}") for k, v in values.items()})
    stages = d.get("stages")
    return RunConfig(
        preset=str(d.get("preset", "debug")),
        stages=None if stages is None else _coerce(stages, int, "stages"),
        model_overrides=dict(d.get("model_overrides", {})),
        pretrained=d.get("pretrained"),
        resume=d.get("resume"),
        **sections,
    )


# ---------------------------------------------------------------------------------------------------------------
# TOML and overrides


def load_config(path: str | None, overrides: list[str] | None = None, defaults: list[str] | None = None) -> RunConfig:
    """The fields' defaults, then a launcher's `defaults` (`section.key=value`), then the TOML file at `path` (if
    any), then `section.key=value` overrides in order."""
    d = to_dict(RunConfig())
    _apply_overrides(d, defaults or [])
    if path is not None:
        _apply_table(d, _read_toml(path))
    _apply_overrides(d, overrides or [])
    cfg = from_dict(d)
    cfg.model_config()  # fail now, not at the first step, on a bad preset or model override
    return cfg


def with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of `cfg` with `section.key=value` overrides applied (checked like load_config's)."""
    d = to_dict(cfg)
    _apply_overrides(d, overrides)
    out = from_dict(d)
    out.model_config()
    return out


def _apply_overrides(d: dict[str, Any], overrides: list[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} is not key=value (e.g. train.steps=20)")
        _apply_value(d, key.strip(), _parse_literal(raw.strip()))


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise UserError(f"config file {path!r} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path!r} is not valid TOML: {exc}") from exc


def _apply_table(d: dict[str, Any], table: dict[str, Any]) -> None:
    for key, value in table.items():
        if isinstance(value, dict) and (key in SECTIONS or key == "model"):
            for sub, v in value.items():
                _apply_value(d, f"{key}.{sub}", v)
        else:
            _apply_value(d, key, value)


def _apply_value(d: dict[str, Any], key: str, value: Any) -> None:
    section, _, name = key.rpartition(".")
    if section == "":
        _check_keys({name: value}, {"preset", "stages"}, "run config (top level)")
        d[name] = str(value) if name == "preset" else _coerce(value, int | None, name)
    elif section == "model":
        types_ = _model_field_types()
        _check_keys({name: value}, set(types_), "[model]")
        d["model_overrides"][name] = _coerce(value, types_[name], key)
    elif section in SECTIONS:
        cls = SECTIONS[section]
        _check_keys({name: value}, _field_names(cls), f"[{section}]")
        d[section][name] = _coerce(value, _field_types(cls)[name], key)
    else:
        valid = ", ".join(["model", *SECTIONS])
        raise UserError(f"unknown config section {section!r} in {key!r}; valid sections: {valid}")


def _parse_literal(raw: str) -> Any:
    """A TOML literal if `raw` is one (3e-3, true, [0.9, 0.95], "text"), else the raw string."""
    if raw.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


# ---------------------------------------------------------------------------------------------------------------
# types


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _model_field_types() -> dict[str, Any]:
    return _field_types(ModelConfig)


def _check_keys(d: dict[str, Any], valid: set[str], where: str) -> None:
    unknown = sorted(set(d) - valid)
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r} in {where}; valid keys: {', '.join(sorted(valid))}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (int, float, str, bool, X | None, tuple[float, ...]); UserError if it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise UserError(f"{key} must be a list of {len(args)} values, like [0.9, 0.95]; got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        return value if isinstance(value, str) else str(value)
    else:
        return value
    raise UserError(f"{key} must be {getattr(tp, '__name__', tp)}, got {value!r}")
