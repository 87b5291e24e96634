"""Staged checkpoints: `gwtf convert` and `gwtf export` round trips and their error paths.

OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_checkpoint.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from gwtf.launch.cli import main
from gwtf.models.checkpoint import (
    default_stage_count,
    export_hf,
    load_pretrained,
    load_staged,
    save_staged,
    weights_hash,
)
from gwtf.models.presets import get_preset
from gwtf.models.staged import build_stages, forward_stages

HF_CLASS = {"llama": LlamaForCausalLM, "gpt": GPT2LMHeadModel}
IDS = torch.tensor([[1, 5, 9, 200, 3, 7, 7, 42], [0, 258, 17, 64, 99, 1, 2, 3]])


def _tokenizer():
    vocab = {"[UNK]": 0, "the": 1, "capital": 2, "of": 3, "italy": 4, "is": 5, "rome": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def _save_hf(tmp_path: Path, family: str, n_layers: int = 4, as_bin: bool = False) -> tuple[Path, torch.nn.Module]:
    cfg = get_preset("debug" if family == "llama" else "debug-gpt").replace(n_layers=n_layers, n_stages=1)
    torch.manual_seed(0)
    model = HF_CLASS[family](cfg.to_hf_config()).eval()
    path = tmp_path / f"hf-{family}"
    model.save_pretrained(str(path))
    if as_bin:  # the older PyTorch pickle format, which transformers 5 still reads but no longer writes
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    _tokenizer().save_pretrained(str(path))
    return path, model


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def _assert_one_line_error(rc: int, err: str, command: str, *fragments: str) -> None:
    assert rc == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"gwtf {command}: error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_convert_then_export_reproduces_logits(tmp_path, capsys, family):
    src, original = _save_hf(tmp_path, family)
    staged, exported = tmp_path / "staged", tmp_path / "export"
    assert _cli(capsys, "convert", "--from", str(src), "--to", str(staged), "--stages", "2")[0] == 0
    assert _cli(capsys, "export", "--from", str(staged), "--to", str(exported))[0] == 0

    cfg, stages, tokenizer = load_staged(staged)
    assert (cfg.family, cfg.n_stages, cfg.n_layers) == (family, 2, 4)
    reloaded = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    with torch.no_grad():
        expected = original(input_ids=IDS).logits
        assert torch.allclose(forward_stages(stages, IDS), expected, atol=1e-6, rtol=0)
        assert torch.allclose(reloaded(input_ids=IDS).logits, expected, atol=1e-6, rtol=0)
    exported_tokenizer = AutoTokenizer.from_pretrained(str(exported))
    assert tokenizer("the capital of italy")["input_ids"] == [1, 2, 3, 4]
    assert exported_tokenizer("the capital of italy")["input_ids"] == [1, 2, 3, 4]


def test_convert_pytorch_bin_and_uneven_split(tmp_path, capsys):
    src, original = _save_hf(tmp_path, "llama", n_layers=5, as_bin=True)
    staged = tmp_path / "staged"
    rc, _ = _cli(capsys, "convert", "--from", str(src), "--to", str(staged), "--stages", "2")
    assert rc == 0
    cfg, stages, _ = load_staged(staged)
    assert [len(r) for r in cfg.layer_ranges()] == [3, 2]
    with torch.no_grad():
        assert torch.allclose(forward_stages(stages, IDS), original(input_ids=IDS).logits, atol=1e-6, rtol=0)


def test_load_pretrained_defaults_to_equal_stages(tmp_path):
    src, _ = _save_hf(tmp_path, "gpt", n_layers=6)
    cfg, stages, tokenizer = load_pretrained(src)
    assert cfg.n_stages == 6 and len(stages) == 7 and tokenizer is not None
    assert default_stage_count(30) == 6 and default_stage_count(7) == 7 and default_stage_count(11) == 1


def test_save_and_load_staged_api_keeps_weights_and_hash(tmp_path):
    cfg = get_preset("debug")
    stages = build_stages(cfg, seed=5)
    save_staged(stages, cfg, tmp_path / "ck")
    cfg2, stages2, tokenizer = load_staged(tmp_path / "ck")
    assert cfg2 == cfg and tokenizer is None
    assert weights_hash(stages2) == weights_hash(stages)
    assert weights_hash(build_stages(cfg, seed=6)) != weights_hash(stages)
    manifest = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert manifest["config_hash"] == cfg.config_hash() and manifest["weights_hash"] == weights_hash(stages)
    export_hf(stages2, cfg2, tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=IDS).logits, forward_stages(stages, IDS), atol=1e-5, rtol=0)


# --- error paths: one line on stderr, exit 2 ------------------------------------------------------------------------


def test_missing_source(tmp_path, capsys):
    rc, err = _cli(capsys, "convert", "--from", str(tmp_path / "nope"), "--to", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "convert", "does not exist")


def test_unsupported_architecture(tmp_path, capsys):
    BertConfig(num_hidden_layers=2).save_pretrained(str(tmp_path / "bert"))
    rc, err = _cli(capsys, "convert", "--from", str(tmp_path / "bert"), "--to", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "convert", "unsupported architecture 'bert'")


def test_too_many_stages_and_unequal_split(tmp_path, capsys):
    src, _ = _save_hf(tmp_path, "llama", n_layers=5)
    rc, err = _cli(capsys, "convert", "--from", str(src), "--to", str(tmp_path / "a"), "--stages", "6")
    _assert_one_line_error(rc, err, "convert", "exceeds the model's 5 layers")
    rc, err = _cli(
        capsys, "convert", "--from", str(src), "--to", str(tmp_path / "b"), "--stages", "2", "--equal-stages"
    )
    _assert_one_line_error(rc, err, "convert", "do not split into 2 equal stages", "1, 5")


def test_corrupt_weights_in_source(tmp_path, capsys):
    src, _ = _save_hf(tmp_path, "gpt")
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    rc, err = _cli(capsys, "convert", "--from", str(src), "--to", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "convert", "cannot load the weights")


def test_not_a_gguf_file(tmp_path, capsys):
    (tmp_path / "weights.txt").write_text("hello")
    rc, err = _cli(capsys, "convert", "--from", str(tmp_path / "weights.txt"), "--to", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "convert", "not .gguf")


def _staged(tmp_path: Path) -> Path:
    cfg = get_preset("debug")
    return save_staged(build_stages(cfg, seed=0), cfg, tmp_path / "staged")


def test_export_refuses_a_non_checkpoint_and_a_non_empty_target(tmp_path, capsys):
    rc, err = _cli(capsys, "export", "--from", str(tmp_path), "--to", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "export", "config.json is missing")
    staged = _staged(tmp_path)
    rc, err = _cli(capsys, "export", "--from", str(staged), "--to", str(staged))
    _assert_one_line_error(rc, err, "export", "not empty")


def test_corrupt_stage_file(tmp_path, capsys):
    staged = _staged(tmp_path)
    (staged / "stage_2.safetensors").write_bytes(b"\x00" * 64)
    rc, err = _cli(capsys, "export", "--from", str(staged), "--to", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "export", "stage_2.safetensors is corrupt")


def test_missing_stage_file(tmp_path, capsys):
    staged = _staged(tmp_path)
    (staged / "stage_1.safetensors").unlink()
    rc, err = _cli(capsys, "export", "--from", str(staged), "--to", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "export", "stage_1.safetensors is missing")


def test_weights_hash_mismatch(tmp_path, capsys):
    staged = _staged(tmp_path)
    path = staged / "stage_3.safetensors"
    state = load_file(str(path))
    name = sorted(state)[0]
    state[name] = state[name] + 1e-3  # a well-formed file with different weights
    save_file(state, str(path))
    rc, err = _cli(capsys, "export", "--from", str(staged), "--to", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "export", "weights hash mismatch")
    assert not (tmp_path / "out").exists()
