"""Pretrained checkpoints in and out of the staged format: `gwtf convert` and `gwtf export`.

    gwtf convert --from HF_DIR_OR_FILE.gguf --to STAGED_DIR [--stages S] [--equal-stages]
    gwtf export --from STAGED_DIR --to HF_DIR

A staged checkpoint directory holds:
    config.json              {"format": "gwtf-staged", "model": ModelConfig dict, "config_hash", "weights_hash",
                              "stage_files", "source", "special_tokens"}
    stage_{k}.safetensors    the state dict of stage k (0 = embedding/head, 1..S = relay stages), local names
    tokenizer files          when the source had a tokenizer (tokenizer.save_pretrained)
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gwtf.errors import UserError
from gwtf.models.presets import ModelConfig, require_equal_stages
from gwtf.models.staged import empty_stage, stages_from_hf, stages_to_hf

log = logging.getLogger(__name__)

FORMAT = "gwtf-staged"
FORMAT_VERSION = 1
MANIFEST = "config.json"
MAX_DEFAULT_STAGES = 8
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


# --- hashing -----------------------------------------------------------------------------------------------------


def weights_hash(stages: list[nn.Module]) -> str:
    """16 hex chars of sha256 over every stage's tensors (name, dtype, shape, bytes), in stage and name order."""
    return _hash_states([stage.state_dict() for stage in stages])


def _hash_states(states: list[dict[str, Tensor]]) -> str:
    digest = hashlib.sha256()
    for k, state in enumerate(states):
        for name in sorted(state):
            tensor = state[name].detach().cpu().contiguous()
            digest.update(f"{k}:{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


# --- staged directory ----------------------------------------------------------------------------------------------


def _stage_file(k: int) -> str:
    return f"stage_{k}.safetensors"


def save_staged(
    stages: list[nn.Module],
    cfg: ModelConfig,
    dir: str | Path,
    tokenizer: Any = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write a staged checkpoint; `source` (path, format, special token ids) is recorded in config.json."""
    out = Path(dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new directory or remove it first")
    if len(stages) != cfg.n_stages + 1:
        raise ValueError(f"expected {cfg.n_stages + 1} stages for {cfg.n_stages} relay stages, got {len(stages)}")
    out.mkdir(parents=True, exist_ok=True)
    states = [{name: t.detach().cpu().contiguous() for name, t in stage.state_dict().items()} for stage in stages]
    for k, state in enumerate(states):
        save_file(state, str(out / _stage_file(k)), metadata={"format": FORMAT, "stage": str(k)})
    source = dict(source or {})
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "config_hash": cfg.config_hash(),
        "weights_hash": _hash_states(states),
        "stage_hashes": [_hash_states([state]) for state in states],  # a replica checks only the stage it loads
        "stage_files": [_stage_file(k) for k in range(len(states))],
        "special_tokens": source.pop("special_tokens", {}),
        "source": source,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _read_manifest(dir: Path) -> dict[str, Any]:
    path = dir / MANIFEST
    if not dir.is_dir():
        raise UserError(f"{dir} is not a directory; pass a staged checkpoint written by `gwtf convert`")
    if not path.is_file():
        raise UserError(f"{path} is missing; {dir} is not a staged checkpoint (write one with `gwtf convert`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-run `gwtf convert`") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a gwtf staged checkpoint manifest; re-run `gwtf convert`")
    return manifest


def _load_stage_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"{path} is missing; the staged checkpoint is incomplete, re-run `gwtf convert`")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for truncated or garbled files
        raise UserError(f"{path} is corrupt ({type(exc).__name__}: {exc}); re-run `gwtf convert`") from exc


def load_staged(dir: str | Path) -> tuple[ModelConfig, list[nn.Module], Any]:
    """Read a staged checkpoint, checking every stage file against the recorded weights hash."""
    root = Path(dir)
    manifest = _read_manifest(root)
    cfg = ModelConfig.from_dict(manifest["model"])
    files = manifest.get("stage_files", [])
    if len(files) != cfg.n_stages + 1:
        raise UserError(f"{root / MANIFEST} lists {len(files)} stage files for {cfg.n_stages} relay stages")
    states = [_load_stage_state(root / name) for name in files]
    if _hash_states(states) != manifest.get("weights_hash"):
        raise UserError(
            f"weights hash mismatch in {root}: the stage files were modified or damaged; re-run `gwtf convert`"
        )
    stages = [_stage_from_state(cfg, k, state, root / files[k]) for k, state in enumerate(states)]
    return cfg, stages, _load_tokenizer(root)


def is_staged(dir: str | Path) -> bool:
    """A gwtf staged checkpoint (its config.json is our manifest, not a Hugging Face config)."""
    try:
        return json.loads((Path(dir) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_manifest(dir: str | Path) -> dict[str, Any]:
    """The staged checkpoint's manifest (model config, hashes, special tokens); UserError if it is not one."""
    return _read_manifest(Path(dir))


def load_stage(dir: str | Path, k: int) -> tuple[ModelConfig, nn.Module]:
    """Stage k alone from a staged checkpoint (what one relay needs), checked against its recorded hash."""
    root = Path(dir)
    manifest = _read_manifest(root)
    cfg = ModelConfig.from_dict(manifest["model"])
    files, hashes = manifest.get("stage_files", []), manifest.get("stage_hashes")
    if not 0 <= k < len(files):
        raise UserError(f"{root} has no stage {k} (it has stages 0..{len(files) - 1})")
    state = _load_stage_state(root / files[k])
    if hashes is None:  # written before per-stage hashes: check the whole checkpoint
        load_staged(root)
    elif _hash_states([state]) != hashes[k]:
        raise UserError(f"stage {k} in {root} does not match its recorded hash: the file was modified or damaged")
    return cfg, _stage_from_state(cfg, k, state, root / files[k])


def _stage_from_state(cfg: ModelConfig, k: int, state: dict[str, Tensor], path: Path) -> nn.Module:
    stage = empty_stage(cfg, k)
    try:
        stage.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{path} does not fit the model config ({first}); re-run `gwtf convert`") from exc
    return stage


def _load_tokenizer(root: Path, **kwargs: Any) -> Any:
    if not (root / "tokenizer_config.json").is_file() and "gguf_file" not in kwargs:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(root), **kwargs)
    except (OSError, ValueError, KeyError) as exc:  # weights are still usable without it: say so and go on
        log.warning("could not load the tokenizer from %s (%s); continuing without one", root, exc)
        return None


# --- import from transformers / GGUF --------------------------------------------------------------------------


def default_stage_count(n_layers: int) -> int:
    """The largest divisor of n_layers up to MAX_DEFAULT_STAGES: equal stages, as many as is sensible."""
    return max(s for s in range(1, min(n_layers, MAX_DEFAULT_STAGES) + 1) if n_layers % s == 0)


def _source_location(path: Path) -> tuple[Path, dict[str, Any]]:
    """(directory for from_pretrained, extra kwargs) for a HF directory or a .gguf file."""
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a Hugging Face model directory or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{path} is a file but not .gguf; pass a .gguf file or a Hugging Face model directory")
        return path.parent, {"gguf_file": path.name}
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; pass a Hugging Face model directory (save_pretrained output)")
    return path, {}


def _load_hf_config(root: Path, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(root), **kwargs)
    except Exception as exc:  # transformers raises ValueError/OSError/KeyError depending on what is wrong
        raise UserError(f"cannot read the model config in {root}: {_one_line(exc)}") from exc


def _load_hf_model(root: Path, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(root), dtype=torch.float32, **kwargs)
    except Exception as exc:  # corrupt or truncated weights surface as many error types
        raise UserError(f"cannot load the weights in {root}: {_one_line(exc)}; check the files") from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def load_pretrained(
    path: str | Path, n_stages: int | None = None, equal_stages: bool = False
) -> tuple[ModelConfig, list[nn.Module], Any]:
    """Load a HF directory or .gguf file and split it; n_stages defaults to `default_stage_count`."""
    cfg, stages, tokenizer, _ = _load_pretrained(Path(path), n_stages, equal_stages)
    return cfg, stages, tokenizer


def _load_pretrained(
    path: Path, n_stages: int | None, equal_stages: bool
) -> tuple[ModelConfig, list[nn.Module], Any, dict[str, Any]]:
    root, kwargs = _source_location(path)
    hf_config = _load_hf_config(root, kwargs)
    cfg = _model_config(hf_config, n_stages)
    if equal_stages:
        require_equal_stages(cfg)
    log.info("loading %s (%s, %d layers) ...", path, cfg.family, cfg.n_layers)
    hf_model = _load_hf_model(root, kwargs)
    stages = stages_from_hf(hf_model, cfg)
    source = {
        "path": str(path.resolve()),
        "format": "gguf" if "gguf_file" in kwargs else "hf",
        "architecture": type(hf_model).__name__,
        "special_tokens": {name: getattr(hf_model.config, name, None) for name in SPECIAL_TOKENS},
    }
    return cfg, stages, _load_tokenizer(root, **kwargs), source


def _model_config(hf_config: Any, n_stages: int | None) -> ModelConfig:
    n_layers = getattr(hf_config, "num_hidden_layers", None)
    if n_stages is None and isinstance(n_layers, int) and n_layers > 0:
        n_stages = default_stage_count(n_layers)
    if n_stages is None or n_stages < 1:
        raise UserError(f"--stages must be >= 1, got {n_stages}")
    if isinstance(n_layers, int) and n_stages > n_layers:
        raise UserError(f"--stages {n_stages} exceeds the model's {n_layers} layers; choose 1..{n_layers}")
    return ModelConfig.from_hf_config(hf_config, n_stages)


# --- export to transformers ----------------------------------------------------------------------------------------


def ensure_staged(path: str | Path, n_stages: int | None, workdir: str | Path) -> Path:
    """`path` itself if it is a staged checkpoint, else its conversion into `workdir` (reused when a previous run
    converted the same source with the same number of stages)."""
    src, out = Path(path), Path(workdir)
    if is_staged(src):
        return src
    if is_staged(out):
        manifest = _read_manifest(out)
        same_split = n_stages is None or manifest["model"]["n_stages"] == n_stages
        if manifest.get("source", {}).get("path") == str(src.resolve()) and same_split:
            return out
        raise UserError(f"{out} holds another conversion; remove it or choose another --workdir")
    cfg, stages, tokenizer, source = _load_pretrained(src, n_stages, False)
    source["path"] = str(src.resolve())
    return save_staged(stages, cfg, out, tokenizer=tokenizer, source=source)


def export_hf(
    stages: list[nn.Module],
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer: Any = None,
    special_tokens: dict[str, Any] | None = None,
) -> Path:
    """Write a directory that `AutoModelForCausalLM.from_pretrained` loads with the stages' weights."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new directory or remove it first")
    model = stages_to_hf(stages, cfg)
    for name, value in (special_tokens or {}).items():
        if name in SPECIAL_TOKENS:  # the source's ids, so generation stops and pads as it did
            setattr(model.config, name, value)
            setattr(model.generation_config, name, value)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
